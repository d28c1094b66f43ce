from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

from mtp_pretrain.data.datasets import Dataset
from mtp_pretrain.data.shard_reader import ShardNotFoundError, ShardReadError, expand_urls
from mtp_pretrain.data.shards import write_shards
from mtp_pretrain.data.stream import PackedBatchStream
from mtp_pretrain.data.tokenizer import load_tokenizer
from mtp_pretrain.errors import DataError
from tests.unit.data.conftest import EOS, N_DOCS, PAD, doc_ids, docs_of, flat, kept_before, make_texts, take


def test_batch_shape_and_dtype(data: dict[str, Any]) -> None:
    s = PackedBatchStream(data["urls"], data["tok"], batch_size=3, sample_len=17)
    for b in take(s, 5):
        assert b.shape == (3, 17) and b.dtype == torch.long
    assert s.batches_yielded == 5
    assert iter(s) is s


@pytest.mark.parametrize("shuffle", [False, True])
def test_one_epoch_is_every_document_once_and_pads_the_end(data: dict[str, Any], shuffle: bool) -> None:
    seq, bsz = 13, 2
    s = PackedBatchStream(data["urls"], data["tok"], bsz, seq, shuffle_shards=shuffle, loop=False, seed=7)
    order = s.epoch_shards(0)
    assert sorted(order) == sorted(data["urls"])
    if not shuffle:
        assert order == data["urls"]
    expected = [t for u in order for t in data["per_shard"][u]]
    got = flat(list(s))
    assert len(got) % (seq * bsz) == 0 and len(got) - len(expected) < seq * bsz
    assert got[: len(expected)] == expected and set(got[len(expected) :]) <= {PAD}  # nothing dropped
    with pytest.raises(StopIteration):
        next(s)


def test_pretokenized_shards_give_the_same_batches(data: dict[str, Any]) -> None:
    a = PackedBatchStream(data["urls"], data["tok"], 2, 24, seed=3)
    b = PackedBatchStream(data["tok_urls"], data["tok"], 2, 24, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(take(a, 40), take(b, 40), strict=True))


def test_epochs_reshuffle_and_continue_stream(data: dict[str, Any]) -> None:
    s = PackedBatchStream(data["urls"], data["tok"], batch_size=2, sample_len=16, seed=3)
    orders = [s.epoch_shards(e) for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1
    n_tokens = sum(len(v) for v in data["per_shard"].values())
    expected = [t for o in orders for u in o for t in data["per_shard"][u]]
    got = flat(take(s, 3 * n_tokens // 32))
    assert got == expected[: len(got)]  # no tokens dropped at epoch boundaries when looping
    assert s.cursors[0]["epoch"] >= 2


def test_readers_split_every_epoch_without_overlap(data: dict[str, Any]) -> None:
    urls = data["urls"]
    for readers in (2, 3, 6):
        for epoch in range(3):
            per_reader = [
                PackedBatchStream(
                    urls, data["tok"], 1, 8, seed=5, reader=r, num_readers=readers
                ).epoch_shards(epoch)
                for r in range(readers)
            ]
            every = [u for shards in per_reader for u in shards]
            assert sorted(every) == sorted(urls)
    # counted by document id: one epoch over 4 readers (1-2 shards each) holds every document exactly once
    seen: list[str] = []
    for r in range(4):
        s = PackedBatchStream(urls, data["tok"], 1, 11, seed=5, reader=r, num_readers=4, loop=False)
        seen += doc_ids(flat(list(s)), data["tok"])
    assert sorted(seen) == [f"doc{i:04d}" for i in range(N_DOCS)]


def test_resume_is_exact(data: dict[str, Any]) -> None:
    kw = dict(batch_size=2, sample_len=24, seed=11)
    ref_stream = PackedBatchStream(data["urls"], data["tok"], **kw)
    n_tokens = sum(len(v) for v in data["per_shard"].values())
    total = int(2.3 * n_tokens) // 48  # a bit more than two epochs
    ref, states = [], [ref_stream.state_dict()]
    for _ in range(total):
        ref.append(next(ref_stream))
        states.append(ref_stream.state_dict())
    m = 4
    positions = [(st["cursors"][0]["epoch"], st["cursors"][0]["shard_pos"]) for st in states]
    shard_change = [
        k
        for k in range(total - m)
        if positions[k][1] != positions[k + 1][1] and positions[k][0] == positions[k + 1][0]
    ]
    epoch_change = [k for k in range(total - m) if positions[k][0] != positions[k + m][0]]
    long_buffer = [
        k for k in range(total - m) if len(states[k]["cursors"][0]["buffer"]) >= 48
    ]  # >1 batch pending
    assert shard_change and epoch_change and long_buffer
    ks = sorted(
        {0, 1, total - m - 1, *shard_change[:6], *epoch_change, *long_buffer[:3], *range(0, total - m, 9)}
    )
    for k in ks:
        b = PackedBatchStream(data["urls"], data["tok"], **kw)
        b.load_state_dict(json.loads(json.dumps(states[k])))  # plain python types only
        for j, batch in enumerate(take(b, m)):
            assert torch.equal(batch, ref[k + j]), (k, j)
        assert b.batches_yielded == k + m
    for k in (shard_change[0], epoch_change[0]):  # a separate run reports the same state
        a = PackedBatchStream(data["urls"], data["tok"], **kw)
        take(a, k)
        assert a.state_dict() == states[k]


def test_resume_state_mismatch(data: dict[str, Any]) -> None:
    st = PackedBatchStream(data["urls"], data["tok"], 1, 8, num_readers=2).state_dict()
    with pytest.raises(ValueError, match="num_readers"):
        PackedBatchStream(data["urls"], data["tok"], 1, 8, num_readers=3).load_state_dict(st)


# ---------------------------------------------------------------- mixing


def test_mix_follows_the_weights_exactly_and_resumes(data: dict[str, Any]) -> None:
    other_texts = make_texts(30, tag="oth")
    other = write_shards(
        [{"key": f"o{i}", "text": t} for i, t in enumerate(other_texts)],
        data["root"] / "other",
        max_docs_per_shard=5,
    )
    mix = [Dataset.of(data["urls"], 0.75, "main"), Dataset.of([str(p) for p in other], 0.25, "other")]
    s = PackedBatchStream(mix, data["tok"], batch_size=4, sample_len=16, seed=1)
    batches = take(s, 50)
    assert s.samples_per_dataset == [150, 50]  # exact shares, by samples (= tokens)
    # the rows interleave each dataset's own packed stream, in order (the mixed stream's own seed per dataset)
    alone = [
        PackedBatchStream([Dataset.of(d.urls, 1.0, d.name)], data["tok"], batch_size=1, sample_len=16, seed=1)
        for d in mix
    ]
    mixed = PackedBatchStream(mix, data["tok"], 1, 16, seed=1)
    alone[1]._epoch_items = lambda e, j: mixed._epoch_items(e, 1)  # dataset 1's shard order in the mix
    heads = [next(a)[0] for a in alone]
    taken = [0, 0]
    for row in (r for b in batches for r in b):
        j = next(j for j in (0, 1) if torch.equal(row, heads[j]))
        taken[j] += 1
        heads[j] = next(alone[j])[0]
    assert taken == [150, 50]
    ids = doc_ids(flat(batches), data["tok"])
    assert any(i.startswith("oth") for i in ids) and any(i.startswith("doc") for i in ids)
    state = s.state_dict()
    after = take(s, 10)
    resumed = PackedBatchStream(mix, data["tok"], batch_size=4, sample_len=16, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 10), after, strict=True))


# ---------------------------------------------------------------- URLs


def test_urls_patterns_directories_and_pipes(data: dict[str, Any]) -> None:
    shard_dir = Path(data["urls"][0]).parent
    assert expand_urls(str(shard_dir)) == data["urls"]
    assert expand_urls(f"{shard_dir}/shard-{{000000..000005}}.tar") == data["urls"]
    pipes = [f"pipe:cat {u}" for u in data["urls"]]
    a = PackedBatchStream(data["urls"], data["tok"], 2, 20, seed=4)
    b = PackedBatchStream(pipes, data["tok"], 2, 20, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(take(a, 30), take(b, 30), strict=True))
    with pytest.raises(DataError, match="no .tar files"):
        expand_urls(str(data["root"]))


# ---------------------------------------------------------------- bad input


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def _bad_shards(data: dict[str, Any], d: Path) -> dict[str, tuple[str, str]]:
    """kind -> (url, counter it increments when skipped)."""
    src = Path(data["urls"][1]).read_bytes()
    (d / "truncated.tar").write_bytes(src[: len(src) // 2 + 100])
    (d / "truncated512.tar").write_bytes(src[:4096])  # cut at a block boundary: tarfile alone won't notice
    (d / "garbage.tar").write_bytes(b"this is not a tar file at all" * 40)
    (d / "zero.tar").write_bytes(b"")
    with tarfile.open(d / "empty.tar", "w"):
        pass
    with tarfile.open(d / "badutf8.tar", "w") as tf:
        _add(tf, "bad.txt", b"caf\xe9 \xff\xfe")
    with tarfile.open(d / "nofield.tar", "w") as tf:
        _add(tf, "rec.json", json.dumps({"content": "no text field here"}).encode())
    with tarfile.open(d / "badnpy.tar", "w") as tf:
        _add(tf, "arr.tokens.npy", b"\x93NUMPY broken")
    return {
        "truncated": (str(d / "truncated.tar"), "shards_skipped"),
        "truncated512": (str(d / "truncated512.tar"), "shards_skipped"),
        "garbage": (str(d / "garbage.tar"), "shards_skipped"),
        "zero-bytes": (str(d / "zero.tar"), "shards_skipped"),
        "missing": (str(d / "missing.tar"), "shards_skipped"),
        "invalid-utf8": (str(d / "badutf8.tar"), "samples_skipped"),
        "json-without-text": (str(d / "nofield.tar"), "samples_skipped"),
        "broken-npy": (str(d / "badnpy.tar"), "samples_skipped"),
    }


def test_every_bad_input_kind_is_skipped_counted_and_named(
    data: dict[str, Any], tmp_path: Path, caplog
) -> None:
    bad = _bad_shards(data, tmp_path)
    good = data["urls"][0]
    expected = data["per_shard"][good]
    for kind, (url, counter) in bad.items():
        caplog.clear()
        s = PackedBatchStream([good, url], data["tok"], 1, 8, loop=False, shuffle_shards=False)
        got = flat(list(s))
        kept = []  # a truncated shard keeps its documents before the damage
        if kind.startswith("truncated"):
            n = kept_before(Path(data["urls"][1]), Path(url).stat().st_size)
            assert n >= 1, kind  # the cuts fall after a few documents: some must be kept
            kept = [t for doc in docs_of(data, data["urls"][1])[:n] for t in doc]
        assert got[: len(expected) + len(kept)] == expected + kept, kind
        assert set(got[len(expected) + len(kept) :]) <= {PAD}, kind
        assert s.errors[counter] == 1 and sum(s.errors.values()) == 1, (kind, s.errors)
        assert Path(url).name in caplog.text, kind
    # a valid tar without members is not an error: it just holds no documents
    s = PackedBatchStream([good, str(tmp_path / "empty.tar")], data["tok"], 1, 8, loop=False)
    assert flat(list(s))[: len(expected)] == expected and sum(s.errors.values()) == 0


def test_bad_input_raises_naming_the_shard_with_on_error_raise(data: dict[str, Any], tmp_path: Path) -> None:
    bad = _bad_shards(data, tmp_path)
    good = data["urls"][0]
    for kind, (url, _) in bad.items():
        if kind == "missing":  # found at construction: an early error
            with pytest.raises(ShardNotFoundError, match="missing.tar"):
                PackedBatchStream([good, url], data["tok"], 1, 8, loop=False, on_error="raise")
            continue
        s = PackedBatchStream(
            [good, url], data["tok"], 1, 8, loop=False, shuffle_shards=False, on_error="raise"
        )
        with pytest.raises(ShardReadError, match=re.escape(Path(url).name)) as e:
            list(s)
        assert "\n" not in str(e.value) and str(e.value).count("data.on_error=skip") == 1, str(e.value)


def test_skips_are_counted_in_the_resumed_state(data: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "garbage.tar").write_bytes(b"not a tar" * 100)
    urls = [*data["urls"], str(tmp_path / "garbage.tar")]
    s = PackedBatchStream(urls, data["tok"], 2, 30, seed=2)
    take(s, sum(map(len, data["per_shard"].values())) // 60 + 5)  # > one epoch
    assert s.errors["shards_skipped"] >= 1
    t = PackedBatchStream(urls, data["tok"], 2, 30, seed=2)
    t.load_state_dict(s.state_dict())
    assert t.errors == s.errors and torch.equal(next(t), next(s))


def test_construction_errors(data: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="6 shard.*7 readers"):
        PackedBatchStream(data["urls"], data["tok"], 1, 8, num_readers=7)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        PackedBatchStream(data["urls"], tmp_path / "tokenizer.json", 1, 8)
    with pytest.raises(ValueError, match="on_error"):
        PackedBatchStream(data["urls"], data["tok"], 1, 8, on_error="ignore")
    with pytest.raises(ValueError, match="weight"):
        Dataset.of(data["urls"], weight=0)
    with pytest.raises(
        ShardNotFoundError, match="2 of 2 shard.*not found, e.g. .*gone-0.tar"
    ):  # even with skip
        PackedBatchStream([str(tmp_path / "gone-0.tar"), str(tmp_path / "gone-1.tar")], data["tok"], 1, 8)


def test_shards_without_documents_do_not_hang(data: dict[str, Any], tmp_path: Path) -> None:
    shard = tmp_path / "images.tar"
    with tarfile.open(shard, "w") as tf:
        _add(tf, "img0.jpg", b"\x89PNG")
    with pytest.raises(ShardReadError, match="contain no readable document"):
        next(PackedBatchStream([str(shard)], data["tok"], 1, 8, loop=True))


# ---------------------------------------------------------------- third-party shards and masks


def test_third_party_shards_in_both_directions(data: dict[str, Any], tmp_path: Path) -> None:
    texts = ["alpha = 1\nprint(alpha)\n", "beta = 'β'\n"]
    shard = tmp_path / "third.tar"
    with tarfile.open(shard, "w") as tf:  # what any webdataset tool writes: key.txt / key.json members
        _add(tf, "a.txt", texts[0].encode())
        _add(tf, "b.json", json.dumps({"body": texts[1], "lang": "py"}).encode())
    tok = load_tokenizer(data["tok"])
    expected = [t for x in texts for t in tok.encode(x, add_special_tokens=False).ids + [EOS]]
    s = PackedBatchStream([str(shard)], data["tok"], 1, 4, loop=False, text_field="body")
    got = flat(list(s))
    assert got[: len(expected)] == expected and sum(s.errors.values()) == 0
    # and our pre-tokenized shards decode with plain webdataset, no project code
    sample = next(iter(wds.WebDataset(data["tok_urls"][0], shardshuffle=False).decode()))
    assert isinstance(sample["tokens.npy"], np.ndarray) and sample["tokens.npy"].dtype == np.uint16
    assert (
        sample["tokens.npy"].tolist() + [EOS]
        == data["per_shard"][data["urls"][0]][: sample["tokens.npy"].size + 1]
    )
