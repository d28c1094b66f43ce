from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds

from mtp_pretrain.data import corpus as corpus_mod
from mtp_pretrain.data.corpus import Corpus, prepare_corpus
from mtp_pretrain.data.stream import PackedBatchStream
from mtp_pretrain.data.tokenizer import load_tokenizer
from mtp_pretrain.errors import DataError


def make_src(root: Path, n: int = 30) -> Path:
    for i in range(n):
        d = root / f"pkg{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        body = "".join(f"    v{j} = {i} * {j}  # ü\n" for j in range(i % 5 + 1))
        (d / f"mod_{i:02d}.py").write_text(f"def func_{i}(x):\n{body}    return x\n")
    (root / "pkg0" / "__pycache__").mkdir()
    (root / "pkg0" / "__pycache__" / "junk.py").write_text("junk = 1\n")
    return root


def _no_training(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("tokenizer retrained although the corpus is cached")


def test_build_then_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    src = make_src(tmp_path / "src")
    c = prepare_corpus([src], tmp_path / "cache", vocab_size=300, max_docs_per_shard=8)
    assert isinstance(c, Corpus)
    assert c.num_docs == 30 and c.num_tokens is not None and c.num_tokens > 30
    assert len(c.train_urls) == 3 and len(c.val_urls) == 1
    all_urls = c.train_urls + c.val_urls
    assert all_urls == sorted(all_urls) and c.val_urls[0].endswith("shard-000003.tar")
    assert c.tokenizer_path.name == "tokenizer.json" and c.tokenizer_path.is_file()
    build_dir = c.tokenizer_path.parent
    manifest = json.loads((build_dir / "corpus.json").read_text())
    assert manifest["num_docs"] == 30 and len(manifest["shards"]) == 4
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [build_dir.name]  # no temp dir left
    out = capsys.readouterr().out
    assert "corpus: tokenizer trained (vocab" in out

    # num_tokens matches what one epoch of the stream sees (every document + its EOS)
    tok = load_tokenizer(c.tokenizer_path)
    n = sum(
        len(tok.encode(s["txt"].decode(), add_special_tokens=False).ids) + 1
        for u in all_urls
        for s in wds.WebDataset(u, shardshuffle=False)
    )
    assert n == c.num_tokens

    mtimes = {p.name: p.stat().st_mtime_ns for p in build_dir.iterdir()}
    monkeypatch.setattr(corpus_mod, "train_tokenizer", _no_training)
    c2 = prepare_corpus([str(src)], tmp_path / "cache", vocab_size=300, max_docs_per_shard=8)
    assert c2 == c
    assert {p.name: p.stat().st_mtime_ns for p in build_dir.iterdir()} == mtimes
    assert "reusing" in capsys.readouterr().out

    # the split is computed per call, not cached
    c3 = prepare_corpus([src], tmp_path / "cache", vocab_size=300, val_shards=2, max_docs_per_shard=8)
    assert len(c3.train_urls) == 2 and c3.val_urls == all_urls[2:]
    with pytest.raises(ValueError, match="4 shard.*val_shards=4"):
        prepare_corpus([src], tmp_path / "cache", vocab_size=300, val_shards=4, max_docs_per_shard=8)

    batch = next(PackedBatchStream(c.train_urls, c.tokenizer_path, batch_size=2, sample_len=9))
    assert batch.shape == (2, 9)


def test_build_options_get_separate_dirs(tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", n=12)
    a = prepare_corpus([src], tmp_path / "cache", vocab_size=300, max_docs_per_shard=4)
    b = prepare_corpus([src], tmp_path / "cache", vocab_size=320, max_docs_per_shard=4)
    c = prepare_corpus([src], tmp_path / "cache", vocab_size=300, max_docs_per_shard=6)
    assert len({a.tokenizer_path.parent, b.tokenizer_path.parent, c.tokenizer_path.parent}) == 3
    assert len(c.train_urls + c.val_urls) == 2


def test_incomplete_build_is_rebuilt(tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", n=12)
    c = prepare_corpus([src], tmp_path / "cache", vocab_size=300, max_docs_per_shard=4)
    build_dir = c.tokenizer_path.parent
    (build_dir / "corpus.json").unlink()  # as if the build had been interrupted
    Path(c.val_urls[0]).unlink()
    (build_dir / "stray.tmp").write_text("x")
    before = time.time_ns()
    c2 = prepare_corpus([src], tmp_path / "cache", vocab_size=300, max_docs_per_shard=4)
    assert c2 == c and (build_dir / "corpus.json").is_file() and Path(c.val_urls[0]).is_file()
    assert c2.tokenizer_path.stat().st_mtime_ns >= before
    assert not (build_dir / "stray.tmp").exists()


def test_bad_sources(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        prepare_corpus([tmp_path / "empty"], tmp_path / "cache", vocab_size=300)
    with pytest.raises(DataError, match="does not exist: .*missing"):
        prepare_corpus([tmp_path / "missing"], tmp_path / "cache", vocab_size=300)
    with pytest.raises(ValueError, match="source_paths is empty"):
        prepare_corpus([], tmp_path / "cache", vocab_size=300)
    # nothing half-built was published
    assert not any(p.name[0] != "." and (p / "corpus.json").exists() for p in (tmp_path / "cache").iterdir())
    assert list((tmp_path / "cache").iterdir()) == []


def test_too_few_shards(tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", n=5)
    with pytest.raises(ValueError, match="1 shard.*val_shards=1.*max_docs_per_shard"):
        prepare_corpus([src], tmp_path / "cache", vocab_size=300, max_docs_per_shard=10)


@pytest.mark.slow
def test_stdlib_corpus(tmp_path: Path) -> None:
    t = time.perf_counter()
    c = prepare_corpus(None, tmp_path / "cache", vocab_size=512)
    assert time.perf_counter() - t < 60
    assert c.num_docs > 300 and c.num_tokens is not None and c.num_tokens > c.num_docs
    assert len(c.val_urls) == 1 and len(c.train_urls) >= 2
    manifest = json.loads((c.tokenizer_path.parent / "corpus.json").read_text())
    assert manifest["sources"][0] == str(corpus_mod.stdlib_path().resolve())
    seen = [json.loads(s["json"])["source"] for s in wds.WebDataset(c.train_urls[0], shardshuffle=False)]
    assert not any(
        part in ("site-packages", "test", "tests", "idlelib", "__pycache__")
        for src in seen
        for part in src.split("/")
    )
    batch = next(
        PackedBatchStream(
            c.train_urls, c.tokenizer_path, batch_size=2, sample_len=65, num_readers=2, reader=1
        )
    )
    assert batch.shape == (2, 65) and int(batch.max()) < 512
