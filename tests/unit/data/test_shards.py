from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds

from mtp_pretrain.data.shards import check_shard_tokenizer, iter_source_documents, token_dtype, write_shards
from mtp_pretrain.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer

KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def make_docs(n: int, prefix: str = "d") -> list[dict[str, Any]]:
    return [
        {
            "key": f"{prefix}{i:04d}",
            "text": f"# doc {i} ✓\n" + f"x_{i} = {i}\n" * (1 + i % 7),
            "meta": {"source": f"f{i}.py"},
        }
        for i in range(n)
    ]


def read_all(urls: list[Path]) -> list[dict[str, Any]]:
    out = []
    for url in urls:
        for s in wds.WebDataset(str(url), shardshuffle=False):
            out.append({"key": s["__key__"], "text": s["txt"].decode("utf-8"), "meta": json.loads(s["json"])})
    return out


# ---------------------------------------------------------------- write_shards


def test_write_and_read_back_with_plain_webdataset(tmp_path: Path) -> None:
    docs = make_docs(25)
    paths = write_shards(iter(docs), tmp_path / "out", max_docs_per_shard=10)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert read_all(paths) == docs
    # nothing but the shards and their manifest is left (the temp dir is gone)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json"] + [p.name for p in paths]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (
        manifest["content"] == "text" and manifest["num_samples"] == 25 and manifest["tokenizer_hash"] is None
    )
    assert [(s["name"], s["samples"], s["bytes"]) for s in manifest["shards"]] == [
        (p.name, n, p.stat().st_size) for p, n in zip(paths, [10, 10, 5], strict=True)
    ]


def test_write_shards_splits_by_bytes(tmp_path: Path) -> None:
    docs = [{"key": f"k{i}", "text": "y" * 3000, "meta": {}} for i in range(10)]
    paths = write_shards(docs, tmp_path, prefix="big", max_bytes_per_shard=5000)
    assert len(paths) == 5 and all(p.name.startswith("big-") for p in paths)
    assert read_all(paths) == docs


def test_write_shards_deterministic_and_replaces_stale(tmp_path: Path) -> None:
    a = write_shards(make_docs(30), tmp_path, max_docs_per_shard=10)
    first = [p.read_bytes() for p in a]
    (tmp_path / "unrelated.tar").write_bytes(b"keep me")
    b = write_shards(make_docs(15), tmp_path, max_docs_per_shard=10)
    assert [p.name for p in b] == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "unrelated.tar",
    ]
    c = write_shards(make_docs(30), tmp_path, max_docs_per_shard=10)
    assert [p.read_bytes() for p in c] == first  # byte-identical for identical input


def test_write_shards_errors_leave_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no documents"):
        write_shards([], tmp_path)
    with pytest.raises(ValueError, match="not tar-safe"):
        write_shards([{"key": "a.b", "text": "x", "meta": {}}], tmp_path)

    def boom() -> Any:
        yield from make_docs(15)
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash"):
        write_shards(boom(), tmp_path, max_docs_per_shard=10)
    assert list(tmp_path.iterdir()) == []  # no half-written shard under a final name


def test_pretokenized_shards_manifest_and_parallel_encoding(tmp_path: Path) -> None:
    docs = make_docs(150)
    tok_path = tmp_path / "tokenizer.json"
    train_tokenizer([d["text"] for d in docs], 300, tok_path)
    one = write_shards(docs, tmp_path / "w1", max_docs_per_shard=40, tokenizer_path=tok_path, workers=1)
    two = write_shards(iter(docs), tmp_path / "w2", max_docs_per_shard=40, tokenizer_path=tok_path, workers=2)
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]  # worker count changes nothing
    tok = load_tokenizer(tok_path)
    ids = [tok.encode(d["text"], add_special_tokens=False).ids for d in docs]
    samples = [s for p in one for s in wds.WebDataset(str(p), shardshuffle=False).decode()]
    assert [s["__key__"] for s in samples] == [d["key"] for d in docs]
    assert [s["tokens.npy"].tolist() for s in samples] == ids
    assert all(
        s["tokens.npy"].dtype == np.uint16 and s["json"] == d["meta"]
        for s, d in zip(samples, docs, strict=True)
    )
    manifest = json.loads((tmp_path / "w1" / "manifest.json").read_text())
    assert manifest["content"] == "tokens" and manifest["tokenizer_hash"] == tokenizer_hash(tok_path)
    assert manifest["num_samples"] == 150 and manifest["num_tokens"] == sum(map(len, ids))
    assert [s["samples"] for s in manifest["shards"]] == [40, 40, 40, 30]
    assert [s["tokens"] for s in manifest["shards"]] == [
        sum(map(len, ids[i : i + 40])) for i in range(0, 150, 40)
    ]
    assert (
        token_dtype(300) == np.uint16
        and token_dtype(2**16) == np.uint16
        and token_dtype(2**16 + 1) == np.uint32
    )


def test_pretokenized_shards_refuse_another_tokenizer(tmp_path: Path) -> None:
    docs = make_docs(20)
    train_tokenizer([d["text"] for d in docs], 300, tmp_path / "a.json")
    train_tokenizer([d["text"] for d in docs] + ["zzzz qqqq"] * 9, 300, tmp_path / "b.json")
    urls = [str(p) for p in write_shards(docs, tmp_path / "s", tokenizer_path=tmp_path / "a.json")]
    check_shard_tokenizer(urls, tmp_path / "a.json")
    with pytest.raises(ValueError, match="tokenized with tokenizer .* data.tokenizer"):
        check_shard_tokenizer(urls, tmp_path / "b.json")


# ---------------------------------------------------------------- iter_source_documents


def _tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__pycache__").mkdir()
    (root / ".hidden").mkdir()
    (root / "b.py").write_text("b = 2\n")
    (root / "a.py").write_text("a = 'ä'\n")
    (root / "pkg" / "__init__.py").write_text("")  # empty: skipped
    (root / "pkg" / "mod.py").write_text("def f():\n    pass\n")
    (root / "pkg" / "sub" / "deep.py").write_text("deep = True\n")
    (root / "pkg" / "notes.md").write_text("not python")
    (root / "pkg" / "__pycache__" / "x.py").write_text("cached = 1\n")
    (root / ".hidden" / "h.py").write_text("hidden = 1\n")
    (root / "pkg" / "latin1.py").write_bytes(b"s = '\xe9\xff'\n")  # not UTF-8


def test_directory_documents(tmp_path: Path) -> None:
    _tree(tmp_path)
    stats: dict[str, int] = {}
    docs = list(iter_source_documents([tmp_path], stats=stats))
    assert [d["meta"]["source"] for d in docs] == ["a.py", "b.py", "pkg/mod.py", "pkg/sub/deep.py"]
    assert docs[0]["text"] == "a = 'ä'\n"
    assert stats["skipped_not_utf8"] == 1 and stats["skipped_empty"] == 1 and stats["docs"] == 4
    keys = [d["key"] for d in docs]
    assert len(set(keys)) == len(keys) and all(KEY_RE.fullmatch(k) for k in keys)
    assert keys == [d["key"] for d in iter_source_documents([str(tmp_path)])]  # stable
    md = list(iter_source_documents([tmp_path], suffixes=(".md", ".py")))
    assert "pkg/notes.md" in [d["meta"]["source"] for d in md]


def test_same_relative_path_in_two_roots_gets_distinct_keys(tmp_path: Path) -> None:
    for r in ("r1", "r2"):
        (tmp_path / r).mkdir()
        (tmp_path / r / "x.py").write_text(f"root = '{r}'\n")
    docs = list(iter_source_documents([tmp_path / "r1", tmp_path / "r2"]))
    assert len({d["key"] for d in docs}) == 2


def test_txt_and_jsonl_documents(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("a whole file\nis one document\n")
    lines = [
        json.dumps({"text": "first ✓", "id": 1}),
        "",
        json.dumps({"text": ""}),
        json.dumps({"text": "third"}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "d2.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"body": "gz doc"}) + "\n")
    raw = b'{"text": "ok"}\n{"text": "bad \xff"}\n'
    (tmp_path / "mixed.jsonl").write_bytes(raw)

    docs = list(iter_source_documents([tmp_path / "one.txt", tmp_path / "d.jsonl"]))
    assert [d["text"] for d in docs] == ["a whole file\nis one document\n", "first ✓", "third"]
    assert [d["meta"]["source"] for d in docs] == ["one.txt", "d.jsonl:1", "d.jsonl:4"]
    gz = list(iter_source_documents([tmp_path / "d2.jsonl.gz"], jsonl_text_field="body"))
    assert [d["text"] for d in gz] == ["gz doc"]
    stats: dict[str, int] = {}
    assert [d["text"] for d in iter_source_documents([tmp_path / "mixed.jsonl"], stats=stats)] == ["ok"]
    assert stats["skipped_not_utf8"] == 1
    all_keys = [d["key"] for d in docs + gz]
    assert all(KEY_RE.fullmatch(k) for k in all_keys) and len(set(all_keys)) == len(all_keys)


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist: .*nowhere"):
        iter_source_documents([tmp_path / "nowhere"])  # raised eagerly, before iterating
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no documents"):
        list(iter_source_documents([tmp_path / "empty"]))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.py").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bin.*no documents"):
        list(iter_source_documents([tmp_path / "bin"]))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported source file .*data.csv"):
        iter_source_documents([tmp_path / "data.csv"])
    (tmp_path / "wrong.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="wrong.jsonl:1.*'text'"):
        list(iter_source_documents([tmp_path / "wrong.jsonl"]))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1: invalid JSON"):
        list(iter_source_documents([tmp_path / "broken.jsonl"]))
    with pytest.raises(ValueError, match="no source paths"):
        iter_source_documents([])


def test_source_to_shards_round_trip(tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    docs = list(iter_source_documents([tmp_path / "src"]))
    paths = write_shards(iter_source_documents([tmp_path / "src"]), tmp_path / "shards", max_docs_per_shard=3)
    assert len(paths) == 2
    assert read_all(paths) == docs
