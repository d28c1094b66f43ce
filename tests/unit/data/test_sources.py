"""A run's data sources (built corpus or pre-built shards) and the validation read the trainer and mtp-eval share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mtp_pretrain import parallel
from mtp_pretrain.config import DataConfig, DatasetConfig
from mtp_pretrain.data import sources
from mtp_pretrain.data.corpus import Corpus
from mtp_pretrain.data.datasets import Dataset
from mtp_pretrain.data.shard_reader import ShardNotFoundError
from mtp_pretrain.data.sources import DataSources, build_data_sources, validation_batches, validation_sets
from mtp_pretrain.data.tokenizer import train_tokenizer
from tests.unit.data.conftest import PAD, flat, make_texts


def test_corpus_sources_are_the_built_corpus_split_into_train_and_val(dist_world, synthetic_source, tmp_path):
    d = DataConfig(source=[str(synthetic_source)], cache_dir=str(tmp_path), vocab_size=300, docs_per_shard=5)
    got = build_data_sources(d)
    assert got.tokenizer_path.is_file() and got.tokenizer_path.parent.parent == tmp_path
    shards = sorted(str(p) for p in got.tokenizer_path.parent.glob("*.tar"))
    assert len(shards) == 8  # 40 files, 5 per shard
    assert got.train == [Dataset(tuple(shards[:-1]), 1.0, "train")]
    assert got.val == [Dataset(tuple(shards[-1:]), 1.0, "val")]  # data.val_shards=1: the last one
    assert build_data_sources(d) == got  # the second call reuses the cache


@pytest.mark.parametrize("rank, order", [(0, ["build", "barrier"]), (1, ["barrier", "build"])])
def test_rank_zero_builds_the_corpus_before_the_others_read_it(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch, rank: int, order: list[str]
) -> None:
    events: list[str] = []

    def prepare_corpus(*args: Any) -> Corpus:
        events.append("build")
        return Corpus(data["urls"][:5], data["urls"][5:], data["tok"], num_docs=60, num_tokens=None)

    monkeypatch.setattr(sources, "prepare_corpus", prepare_corpus)
    monkeypatch.setattr(parallel, "rank", lambda: rank)
    monkeypatch.setattr(parallel, "barrier", lambda: events.append("barrier"))
    got = build_data_sources(DataConfig(source=["src"]))
    assert events == order
    assert got == DataSources(
        data["tok"],
        [Dataset(tuple(data["urls"][:5]), 1.0, "train")],
        [Dataset(tuple(data["urls"][5:]), 1.0, "val")],
    )


def test_prebuilt_shards_are_the_configured_mix(data: dict[str, Any]) -> None:
    shard_dir = str(Path(data["urls"][0]).parent)
    d = DataConfig(
        datasets=[
            DatasetConfig(urls=[shard_dir], weight=3.0, name="text"),
            DatasetConfig(urls=data["tok_urls"][:4], name="tokens"),
        ],
        val_urls=data["tok_urls"][4:],
        tokenizer=str(data["tok"]),
    )
    got = build_data_sources(d)
    assert got.tokenizer_path == data["tok"]
    text, tokens = (
        Dataset(tuple(data["urls"]), 3.0, "text"),
        Dataset(tuple(data["tok_urls"][:4]), 1.0, "tokens"),
    )
    assert got.train == [text, tokens]  # the directory stands for its shards
    assert got.val == [Dataset(tuple(data["tok_urls"][4:]), 1.0, "val")]
    d.val_urls = []
    assert build_data_sources(d).val == []  # a run without validation (trainer.val_every=0)


def test_validation_sets_need_only_the_validation_shards(data: dict[str, Any], tmp_path: Path) -> None:
    """mtp-eval reads a run's validation set where the training shards and tokenizer file are gone."""
    gone = [str(tmp_path / "deleted" / "shard-000000.tar")]
    d = DataConfig(
        datasets=[DatasetConfig(urls=gone)],
        val_urls=data["tok_urls"][4:],
        tokenizer=str(tmp_path / "no.json"),
    )
    assert validation_sets(d) == [Dataset(tuple(data["tok_urls"][4:]), 1.0, "val")]


def test_prebuilt_shards_of_another_tokenizer_are_refused(data: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    train_tokenizer(make_texts(20, "other"), 300, other)
    d = DataConfig(datasets=[DatasetConfig(urls=data["tok_urls"])], tokenizer=str(other))
    with pytest.raises(ValueError, match="were tokenized with tokenizer"):
        build_data_sources(d)


def test_validation_batches_read_one_epoch_from_the_start_every_time(data: dict[str, Any]) -> None:
    val, seq, bsz = [Dataset.of(data["urls"], name="val")], 13, 2
    first, again = (
        list(validation_batches(val, data["tok"], bsz, seq)),
        list(validation_batches(val, data["tok"], bsz, seq)),
    )
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # shards in the given order (unshuffled), every document once, the last batch PAD-filled, no second epoch
    expected = [t for u in data["urls"] for t in data["per_shard"][u]]
    got = flat(first)
    assert got[: len(expected)] == expected and set(got[len(expected) :]) <= {PAD}
    assert len(got) - len(expected) < seq * bsz


def test_validation_readers_take_every_other_shard_in_order(data: dict[str, Any]) -> None:
    val = [Dataset.of(data["urls"], name="val")]
    for r in range(2):
        stream = validation_batches(val, data["tok"], 1, 11, reader=r, num_readers=2)
        expected = [t for u in data["urls"][r::2] for t in data["per_shard"][u]]
        got = flat(list(stream))
        assert got[: len(expected)] == expected and set(got[len(expected) :]) <= {PAD}
        with pytest.raises(StopIteration):
            next(stream)


def test_validation_batches_follow_the_error_policy(data: dict[str, Any], tmp_path: Path) -> None:
    val = [Dataset.of([*data["urls"], str(tmp_path / "missing.tar")], name="val")]
    with pytest.raises(ShardNotFoundError, match="1 of 7 shard"):
        validation_batches(val, data["tok"], 2, 13, on_error="raise")
    stream = validation_batches(
        val, data["tok"], 2, 13
    )  # on_error="skip": the rest is read, the miss counted
    assert flat(list(stream))[:5] == data["per_shard"][data["urls"][0]][:5]
    assert stream.errors["shards_skipped"] == 1
