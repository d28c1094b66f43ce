"""Bad data fails early and cleanly: the pre-flight check, one rule for truncated files and ``pipe:`` streams,
failing commands, and one-line errors from DataLoader workers and validation (issue 17)."""

from __future__ import annotations

import gzip
import logging
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from mtp_pretrain.config import Config, DataConfig, DatasetConfig
from mtp_pretrain.data.datasets import Dataset
from mtp_pretrain.data.loader import BatchLoader
from mtp_pretrain.data.shard_reader import ShardNotFoundError, ShardReadError, iter_samples, probe_shard
from mtp_pretrain.data.sources import build_data_sources, preflight, validation_batches, validation_sets
from mtp_pretrain.data.stream import PackedBatchStream
from mtp_pretrain.errors import DataError
from mtp_pretrain.validator import Validator
from tests.unit.data.conftest import EOS, PAD, docs_of, flat, kept_before

HINT = "data.on_error=skip"


def _one_line_naming(error: BaseException, name: str) -> str:
    """The error's message, asserted to be one line that names ``name`` and gives the skip hint at most once."""
    msg = str(error)
    assert "\n" not in msg and "Traceback" not in msg and "DataLoader worker" not in msg, msg
    assert name in msg and msg.count(HINT) <= 1, msg
    return msg


def _cut(src: Path, size: int, out: Path) -> str:
    out.write_bytes(src.read_bytes()[:size])
    return str(out)


def _read(url: str, tok: Path, on_error: str = "skip") -> tuple[list[int], dict[str, int]]:
    s = PackedBatchStream([url], tok, 1, 7, loop=False, on_error=on_error)
    got = flat(list(s))
    while got and got[-1] == PAD:  # the PAD filling the last batch
        got.pop()
    return got, s.errors


# ---------------------------------------------------------------- truncation: one rule for files and pipe:


@pytest.mark.parametrize("where", ["member boundary", "inside a member", "end marker only"])
def test_a_truncated_shard_gives_the_same_documents_from_a_file_and_a_pipe(
    data: dict[str, Any], tmp_path: Path, where: str
) -> None:
    src = Path(data["urls"][2])
    with tarfile.open(src) as tf:
        members = tf.getmembers()

    def end(m: tarfile.TarInfo) -> int:
        return m.offset_data + (m.size + 511) // 512 * 512

    m = members[7]  # a few samples in
    size = {
        "member boundary": end(m),  # what tarfile alone reads as a whole (shorter) archive
        "inside a member": m.offset_data + 3,
        "end marker only": end(members[-1]) + 512,  # the first zero block of the marker: nothing lost
    }[where]
    url = _cut(src, size, tmp_path / "cut.tar")
    n = kept_before(src, size) if where != "end marker only" else 10
    expected = [t for doc in docs_of(data, str(src))[:n] for t in doc]
    for u in (url, f"pipe:cat {url}"):
        got, errors = _read(u, data["tok"])
        assert got == expected, (u, len(got), len(expected))  # the documents before the damage, no more
        assert errors == {"shards_skipped": int(where != "end marker only"), "samples_skipped": 0}, u
    if where == "end marker only":
        return
    for u in (url, f"pipe:cat {url}"):  # raise: at the damage, after the documents before it
        s = PackedBatchStream([u], data["tok"], 1, 7, loop=False, on_error="raise")
        read: list[torch.Tensor] = []
        with pytest.raises(ShardReadError) as e:
            for b in s:
                read.append(b)
        msg = _one_line_naming(e.value, u)
        assert f"after {n} sample(s)" in msg and HINT in msg
        assert (
            flat(read)[: len(expected) - 10] == expected[: len(expected) - 10]
        )  # the last batch may be held


def test_a_truncated_gzip_shard_follows_the_same_rule(data: dict[str, Any], tmp_path: Path) -> None:
    src = Path(data["urls"][3])
    whole = tmp_path / "s.tar.gz"
    whole.write_bytes(gzip.compress(src.read_bytes()))
    full, errors = _read(str(whole), data["tok"])
    assert full == [t for doc in docs_of(data, str(src)) for t in doc] and sum(errors.values()) == 0
    url = _cut(whole, whole.stat().st_size // 2, tmp_path / "cut.tar.gz")
    results = [_read(u, data["tok"]) for u in (url, f"pipe:cat {url}")]
    assert results[0] == results[1]
    got, errors = results[0]
    assert 0 < len(got) < len(full) and got == full[: len(got)] and errors["shards_skipped"] == 1


def test_resume_inside_a_truncated_shard_is_exact(data: dict[str, Any], tmp_path: Path) -> None:
    src = Path(data["urls"][0])
    url = _cut(src, src.stat().st_size * 2 // 3, tmp_path / "cut.tar")
    ref = PackedBatchStream([url, data["urls"][1]], data["tok"], 1, 9, loop=False, shuffle_shards=False)
    first = [next(ref) for _ in range(3)]
    state, rest = ref.state_dict(), list(ref)
    assert first and state["cursors"][0]["shard_pos"] == 0  # stopped inside the truncated shard
    again = PackedBatchStream([url, data["urls"][1]], data["tok"], 1, 9, loop=False, shuffle_shards=False)
    again.load_state_dict(state)
    assert flat(list(again)) == flat(rest) and again.errors == ref.errors == {
        "shards_skipped": 1,
        "samples_skipped": 0,
    }


# ---------------------------------------------------------------- pipe: commands


@pytest.mark.parametrize("cmd", ["pipe:false", "pipe:cat /nonexistent/shard.tar"])
def test_a_failing_pipe_command_is_a_shard_error_naming_it(data: dict[str, Any], cmd: str) -> None:
    with pytest.raises(ShardReadError) as e:
        list(iter_samples(cmd, 0))
    msg = _one_line_naming(e.value, cmd)
    assert "exited with status 1" in msg
    if "cat" in cmd:
        assert "No such file" in msg  # the command's own complaint
    s = PackedBatchStream([cmd, data["urls"][0]], data["tok"], 1, 7, loop=False, shuffle_shards=False)
    got = flat(list(s))  # skip: counted, the next shard read
    assert got[:50] == data["per_shard"][data["urls"][0]][:50] and s.errors["shards_skipped"] == 1


def test_a_command_failing_after_a_whole_tar_is_an_error(data: dict[str, Any]) -> None:
    url = f"pipe:cat {data['urls'][0]}; exit 3"
    assert sum(1 for _ in iter_samples(f"pipe:cat {data['urls'][0]}", 0)) == 10
    with pytest.raises(ShardReadError, match="exited with status 3"):
        list(iter_samples(url, 0))


def test_a_pipe_read_only_in_part_is_stopped(data: dict[str, Any]) -> None:
    samples = iter_samples(f"pipe:cat {data['urls'][0]}", 0)
    next(samples)
    proc = samples.gi_frame.f_locals["src"].proc
    samples.close()  # the reader stops early (a validation that has read enough)
    assert proc.returncode is not None


# ---------------------------------------------------------------- DataLoader workers


def _bad_kinds(data: dict[str, Any], d: Path) -> dict[str, str]:
    src = Path(data["urls"][1]).read_bytes()
    (d / "trunc.tar").write_bytes(src[:4096])
    (d / "garbage.tar").write_bytes(b"not a tar " * 100)
    with tarfile.open(d / "latin1.tar", "w") as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 4
        tf.addfile(info, __import__("io").BytesIO(b"caf\xe9"))
    gz = gzip.compress(src)
    (d / "cut.tar.gz").write_bytes(gz[: len(gz) // 2])
    return {
        "truncated": str(d / "trunc.tar"),
        "not a tar": str(d / "garbage.tar"),
        "not UTF-8": str(d / "latin1.tar"),
        "truncated gzip": str(d / "cut.tar.gz"),
        "failing pipe": "pipe:cat /nonexistent/x.tar",
    }


@pytest.mark.parametrize("workers", [0, 1])
def test_worker_errors_are_the_one_line_shard_error(
    data: dict[str, Any], tmp_path: Path, workers: int
) -> None:
    for kind, url in _bad_kinds(data, tmp_path).items():
        ldr = BatchLoader(
            [Dataset.of([url])], data["tok"], 1, 5, seed=0, num_workers=workers, on_error="raise"
        )
        with pytest.raises(ShardReadError) as e:
            for _ in range(200):  # a truncated shard first hands out its documents before the damage
                next(ldr)
        ldr.close()
        msg = _one_line_naming(e.value, url)
        assert HINT in msg, kind
        # the same message with and without a worker process
        assert msg == str(_in_process_error(data, url)), kind


def _in_process_error(data: dict[str, Any], url: str) -> ShardReadError:
    s = PackedBatchStream([Dataset.of([url])], data["tok"], 1, 5, on_error="raise")
    with pytest.raises(ShardReadError) as e:
        for _ in range(200):
            next(s)
    return e.value


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_with_no_readable_shard_is_one_line_too(
    data: dict[str, Any], tmp_path: Path, workers: int
) -> None:
    bad = _bad_kinds(data, tmp_path)
    urls = [bad["not a tar"], bad["not UTF-8"], bad["failing pipe"]]
    ldr = BatchLoader([Dataset.of(urls, name="web")], data["tok"], 1, 5, seed=0, num_workers=workers)
    with pytest.raises(ShardReadError) as e:
        next(ldr)
    ldr.close()
    msg = _one_line_naming(e.value, "contain no readable document")
    assert "'web'" in msg and HINT not in msg  # skip was asked for: the fix is the data


# ---------------------------------------------------------------- pre-flight


def test_probe_reads_only_the_first_member(data: dict[str, Any], tmp_path: Path) -> None:
    src = Path(data["urls"][0])
    with tarfile.open(src) as tf:
        first, second = tf.getmembers()[:2]
    # damaged after the first member: not the pre-flight's business (the reader counts it)
    probe_shard(_cut(src, second.offset_data + 10, tmp_path / "late.tar"))
    probe_shard(f"pipe:cat {tmp_path / 'nothing.tar'}")  # pipe: not checked
    cases = {
        "early.tar": first.offset_data + first.size // 2,  # first member's data cut short
        "header.tar": 300,  # inside the first header
    }
    for name, size in cases.items():
        with pytest.raises(ShardReadError, match="first member cannot be read") as e:
            probe_shard(_cut(src, size, tmp_path / name))
        _one_line_naming(e.value, name)
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(ShardReadError, match="empty shard"):
        probe_shard(str(tmp_path / "zero.tar"))
    with pytest.raises(ShardNotFoundError, match="gone.tar"):
        probe_shard(str(tmp_path / "gone.tar"))


def _prebuilt(
    data: dict[str, Any], val: list[str], on_error: str, train: list[str] | None = None
) -> DataConfig:
    return DataConfig(
        datasets=[DatasetConfig(urls=train or data["urls"][:4], name="text")],
        val_urls=val,
        tokenizer=str(data["tok"]),
        on_error=on_error,
    )


def test_a_missing_validation_shard_fails_at_start(data: dict[str, Any], tmp_path: Path, caplog) -> None:
    gone = str(tmp_path / "val-000001.tar")
    val = [data["urls"][4], gone]
    with pytest.raises(ShardNotFoundError) as e:
        build_data_sources(_prebuilt(data, val, "raise"))
    msg = _one_line_naming(e.value, gone)
    assert "'val'" in msg and HINT in msg
    with pytest.raises(ShardNotFoundError):
        validation_sets(_prebuilt(data, val, "raise"))  # mtp-eval checks the same
    # skip: warned, left in the set (every rank keeps the same shard lists), skipped when read
    with caplog.at_level(logging.WARNING):
        got = build_data_sources(_prebuilt(data, val, "skip"))
    assert got.val == [Dataset(tuple(val), 1.0, "val")] and gone in caplog.text
    # ... but a dataset none of whose shards is readable fails either way
    for policy in ("skip", "raise"):
        with pytest.raises(DataError) as e:
            build_data_sources(_prebuilt(data, [gone], policy))
        _one_line_naming(e.value, gone)
    with pytest.raises(DataError, match="none of its 1 shard"):
        build_data_sources(_prebuilt(data, [gone], "skip"))


def test_preflight_checks_training_shards_and_counts_bad_ones(data: dict[str, Any], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar " * 100)
    train = [*data["urls"][:4], str(garbage)]
    with pytest.raises(ShardReadError, match="garbage.tar.*not a readable tar|garbage.tar.*first member"):
        build_data_sources(_prebuilt(data, [], "raise", train))
    assert preflight([Dataset.of(train, name="text")], "skip") == 1
    # pipe: and remote URLs are not read in pre-flight (not cheap): a dataset of them passes
    assert preflight([Dataset.of(["pipe:false"], name="p")], "raise") == 0


# ---------------------------------------------------------------- validation follows data.on_error


class _Engine:
    """Stands in for the engine: consumes the validation batches as eval_step would."""

    def eval_step(self, batches: Any, n: int, seq: int, mb: int) -> tuple[None, None]:
        self.seen = [b[0] for b in batches]
        return None, None


def _validator(data: dict[str, Any], urls: list[str], on_error: str) -> Validator:
    cfg = Config()
    cfg.model.seq_len, cfg.mtp.n, cfg.trainer.val_batches, cfg.data.on_error = 8, 2, 30, on_error
    return Validator(cfg, _Engine(), [Dataset.of(urls, name="val")], data["tok"], EOS, PAD, 0, 1)


def test_validation_follows_the_error_policy(data: dict[str, Any], tmp_path: Path, caplog) -> None:
    urls = [*_bad_kinds(data, tmp_path).values(), data["urls"][5]]
    v = _validator(data, urls, "skip")
    with caplog.at_level(logging.WARNING):
        assert v.run() == {}
    assert v.errors == {"shards_skipped": 4, "samples_skipped": 1}  # truncated/garbage/gzip/pipe + 1 sample
    assert "validation (DP rank 0) skipped bad data" in caplog.text
    v = _validator(data, urls, "raise")
    with pytest.raises(ShardReadError) as e:
        v.run()
    _one_line_naming(e.value, urls[0])
    # the raw validation stream, as mtp-eval reads it
    with pytest.raises(ShardReadError, match="garbage.tar"):
        list(validation_batches([Dataset.of(urls[1:], name="val")], data["tok"], 2, 9, on_error="raise"))


def test_a_validation_read_of_only_bad_shards_fails_even_with_skip(
    data: dict[str, Any], tmp_path: Path
) -> None:
    bad = _bad_kinds(data, tmp_path)
    val = [Dataset.of([bad["not a tar"], bad["failing pipe"]], name="eval")]
    with pytest.raises(ShardReadError, match="contain no readable document") as e:
        list(validation_batches(val, data["tok"], 2, 9))  # mtp-eval --data: no numbers over no data
    _one_line_naming(e.value, "garbage.tar")
    # a valid tar without documents is not bad data: an empty read, no error
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert list(validation_batches([Dataset.of([str(tmp_path / "empty.tar")])], data["tok"], 2, 9)) == []
