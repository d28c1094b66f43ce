"""Documents from source trees / text / JSONL files, written as webdataset tar shards + a manifest.

A document is ``{"key": str, "text": str, "meta": {"source": str}}``. In a shard each document is the
two members ``<key>.txt`` (UTF-8 text) and ``<key>.json`` (the meta dict), or, pre-tokenized,
``<key>.tokens.npy`` + ``<key>.json``; both are readable by a plain ``webdataset.WebDataset(url)``.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from mtp_pretrain.data.shard_reader import TOKENS_MEMBER, local_path
from mtp_pretrain.data.tokenizer import load_tokenizer, tokenizer_hash

log = logging.getLogger(__name__)

SHARD_RE = r"{prefix}-(\d{{6}})\.tar"
DEFAULT_EXCLUDE_DIRS = ("__pycache__",)


def doc_key(source: str, root_index: int = 0) -> str:
    """A stable, unique, tar-safe key: readable tail of ``source`` + a hash. No dots, no slashes."""
    digest = hashlib.sha1(f"{root_index}\0{source}".encode()).hexdigest()[:12]
    tail = re.sub(r"[^A-Za-z0-9]+", "_", source).strip("_")[-64:]
    return f"{tail}_{digest}" if tail else digest


def _is_jsonl(p: Path) -> bool:
    return p.name.endswith((".jsonl", ".jsonl.gz"))


def _count(stats: dict[str, int], name: str) -> None:
    stats[name] = stats.get(name, 0) + 1


def _read_text_file(path: Path, stats: dict[str, int]) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        _count(stats, "skipped_not_utf8")
        log.info("skipping %s: not valid UTF-8", path)
    except OSError as e:
        _count(stats, "skipped_unreadable")
        log.warning("skipping %s: %s", path, e)
    return None


def _walk(root: Path, suffixes: tuple[str, ...], exclude_dirs: frozenset[str]) -> Iterator[Path]:
    """Files under ``root`` with one of ``suffixes``, in sorted (deterministic) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(suffixes) and not name.startswith("."):
                yield Path(dirpath) / name


def _lines_of(path: Path, fh: Any) -> Iterator[bytes]:
    """The lines of an opened (maybe gzip) file; a cut or corrupt .gz is an error naming the file."""
    try:
        yield from fh
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: corrupt or truncated file ({e}); re-download or re-compress it") from None


def _iter_path(
    i: int, path: Path, suffixes: tuple[str, ...], field: str, exclude: frozenset[str], stats: dict[str, int]
) -> Iterator[dict[str, Any]]:
    if path.is_dir():
        for f in _walk(path, suffixes, exclude):
            source = f.relative_to(path).as_posix()
            text = _read_text_file(f, stats)
            if text:
                yield {"key": doc_key(source, i), "text": text, "meta": {"source": source}}
            elif text is not None:
                _count(stats, "skipped_empty")
    elif _is_jsonl(path):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(_lines_of(path, fh), start=1):
                source = f"{path.name}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    _count(stats, "skipped_not_utf8")
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or field not in rec:
                    raise ValueError(f"{path}:{lineno}: record has no {field!r} field (jsonl_text_field)")
                text = rec[field]
                if text is not None and not isinstance(text, str):
                    raise ValueError(
                        f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string"
                    )
                if text:
                    yield {"key": doc_key(source, i), "text": text, "meta": {"source": source}}
                else:
                    _count(stats, "skipped_empty")
    else:
        text = _read_text_file(path, stats)
        if text:
            yield {"key": doc_key(path.name, i), "text": text, "meta": {"source": path.name}}
        elif text is not None:
            _count(stats, "skipped_empty")


def iter_source_documents(
    paths: Sequence[str | Path],
    suffixes: Sequence[str] = (".py",),
    jsonl_text_field: str = "text",
    exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE_DIRS,
    stats: dict[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield documents from ``paths`` in a deterministic order.

    - directory: files ending in one of ``suffixes``, walked in sorted order; directories named in
      ``exclude_dirs`` and hidden files/directories are pruned;
    - ``.jsonl`` / ``.jsonl.gz``: one document per line, text in ``jsonl_text_field``;
    - ``.txt`` (or a file ending in one of ``suffixes``): one document.

    Files (JSONL lines) that are not valid UTF-8 are skipped, as are empty documents; the counts are added
    to ``stats`` if given. Missing/unsupported paths raise ``ValueError`` immediately; a path that yields no
    document raises ``ValueError`` when the iteration reaches its end.
    """
    sfx = tuple(suffixes)
    checked: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ValueError(f"source path does not exist: {p}")
        if not os.access(p, os.R_OK):
            raise ValueError(f"source path is not readable: {p}")
        if p.is_file() and not (_is_jsonl(p) or p.name.endswith((".txt", *sfx))):
            raise ValueError(
                f"unsupported source file {p}: expected a directory, .txt, .jsonl, .jsonl.gz "
                f"or a file ending in {sfx}"
            )
        checked.append(p)
    if not checked:
        raise ValueError("no source paths given")
    return _iter_all(
        checked, sfx, jsonl_text_field, frozenset(exclude_dirs), stats if stats is not None else {}
    )


def _iter_all(
    paths: list[Path], sfx: tuple[str, ...], field: str, exclude: frozenset[str], stats: dict[str, int]
) -> Iterator[dict[str, Any]]:
    for i, p in enumerate(paths):
        n = 0
        for doc in _iter_path(i, p, sfx, field, exclude, stats):
            n += 1
            yield doc
        if n == 0:
            what = f"no non-empty files ending in {sfx}" if p.is_dir() else "no non-empty UTF-8 documents"
            raise ValueError(f"source path {p} yielded no documents ({what})")
        stats["docs"] = stats.get("docs", 0) + n
    skipped = {k: v for k, v in stats.items() if k.startswith("skipped") and k != "skipped_empty"}
    if skipped:
        log.warning("source documents skipped: %s", skipped)


MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_ENCODE_CHUNK = 64  # documents per task sent to an encoding worker


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


_worker_tokenizer: Any = None


def _init_encoder(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in _worker_tokenizer.encode_batch(texts, add_special_tokens=False)]


def _chunks(docs: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded(
    docs: Iterable[dict[str, Any]], tokenizer_path: str | Path | None, workers: int
) -> Iterator[tuple[dict[str, Any], list[int] | None]]:
    """``(doc, token ids or None)`` in input order; ``workers`` processes encode chunks of documents."""
    if tokenizer_path is None:
        yield from ((d, None) for d in docs)
        return
    if workers <= 1:
        _init_encoder(str(tokenizer_path))
        for chunk in _chunks(docs, _ENCODE_CHUNK):
            yield from zip(chunk, _encode_chunk([d["text"] for d in chunk]), strict=True)
        return
    # map() over a bounded window of chunks keeps memory flat and the input order (identical shards for
    # any number of workers)
    window = workers * 8
    with multiprocessing.get_context("fork").Pool(workers, _init_encoder, (str(tokenizer_path),)) as pool:
        chunks = _chunks(docs, _ENCODE_CHUNK)
        while batch := list(itertools.islice(chunks, window)):
            for chunk, ids in zip(
                batch, pool.map(_encode_chunk, [[d["text"] for d in c] for c in batch]), strict=True
            ):
                yield from zip(chunk, ids, strict=True)


def write_shards(
    docs: Iterable[dict[str, Any]],
    out_dir: str | Path,
    prefix: str = "shard",
    max_docs_per_shard: int = 1000,
    max_bytes_per_shard: int = 64 * 2**20,
    tokenizer_path: str | Path | None = None,
    workers: int = 1,
    progress: bool = False,
) -> list[Path]:
    """Write ``docs`` to ``out_dir/{prefix}-000000.tar``, ``...-000001.tar``, ... + ``manifest.json``;
    return the shard paths, sorted.

    Without ``tokenizer_path`` a document is ``<key>.txt`` + ``<key>.json`` (its meta dict); with it, the
    text is encoded (by ``workers`` processes) and stored as ``<key>.tokens.npy`` (uint16, or uint32 for
    vocabularies above 65536) + ``<key>.json``. Both are readable by a plain ``webdataset.WebDataset``.
    The manifest lists every shard with its sample, token (pre-tokenized only) and byte counts, and the
    tokenizer hash.

    A new shard starts when the current one has ``max_docs_per_shard`` documents or at least
    ``max_bytes_per_shard`` bytes (so a shard may exceed the byte limit by one document). Shards are
    written into a temporary directory and renamed into place; after success, older
    ``{prefix}-NNNNNN.tar`` files in ``out_dir`` that are not part of this set are removed.
    Raises ``ValueError`` if ``docs`` is empty.
    """
    if max_docs_per_shard < 1 or max_bytes_per_shard < 1:
        raise ValueError("max_docs_per_shard and max_bytes_per_shard must be >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"shard prefix must match [A-Za-z0-9_-]+, got {prefix!r}")
    dtype = None
    if tokenizer_path is not None:
        dtype = token_dtype(load_tokenizer(tokenizer_path).get_vocab_size())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{prefix}.tmp-"))
    counts: dict[str, dict[str, int]] = {}
    bar = tqdm(
        desc="documents", unit=" docs", disable=None if progress else True, mininterval=1.0
    )  # None: TTY only
    try:
        pattern = str(tmp / f"{prefix}-%06d.tar")
        # mtime fixed => byte-identical shards for identical input
        with wds.ShardWriter(
            pattern, maxcount=max_docs_per_shard, maxsize=max_bytes_per_shard, verbose=0, mtime=0
        ) as sink:
            for doc, ids in _encoded(docs, tokenizer_path, workers):
                key = doc["key"]
                if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
                    raise ValueError(
                        f"document key {key!r} is not tar-safe (allowed: letters, digits, _ and -)"
                    )
                sample: dict[str, Any] = {"__key__": key, "json": doc.get("meta", {})}
                if ids is None:
                    sample["txt"] = doc["text"]
                else:
                    sample[TOKENS_MEMBER] = np.asarray(ids, dtype=dtype)
                sink.write(sample)
                c = counts.setdefault(Path(sink.fname).name, {"samples": 0, "tokens": 0})
                c["samples"] += 1
                c["tokens"] += len(ids) if ids is not None else 0
                bar.update(1)
        if not counts:
            raise ValueError(f"no documents to write to {out}")
        written = sorted(tmp.glob(f"{prefix}-*.tar"))
        for f in written:
            counts[f.name]["bytes"] = f.stat().st_size
            os.replace(f, out / f.name)
        _write_manifest(out, counts, tokenizer_path)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    final = [out / f.name for f in written]
    keep = {f.name for f in final}
    for old in out.iterdir():
        if re.fullmatch(SHARD_RE.format(prefix=re.escape(prefix)), old.name) and old.name not in keep:
            old.unlink()
    return final


def _write_manifest(out: Path, counts: dict[str, dict[str, int]], tokenizer_path: str | Path | None) -> None:
    tokenized = tokenizer_path is not None
    manifest = {
        "format": MANIFEST_FORMAT,
        "content": "tokens" if tokenized else "text",
        "tokenizer_hash": tokenizer_hash(tokenizer_path) if tokenized else None,
        "num_samples": sum(c["samples"] for c in counts.values()),
        "num_tokens": sum(c["tokens"] for c in counts.values()) if tokenized else None,
        "shards": [
            {"name": name, **c, **({} if tokenized else {"tokens": None})}
            for name, c in sorted(counts.items())
        ],
    }
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".manifest.")
    with os.fdopen(fd, "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / MANIFEST)


def check_shard_tokenizer(urls: Sequence[str], tokenizer_path: str | Path) -> None:
    """Refuse pre-tokenized shards whose manifest names another tokenizer than ``tokenizer_path``."""
    want = tokenizer_hash(tokenizer_path)
    seen: set[Path] = set()
    for url in urls:
        lp = local_path(url)
        if lp is None or Path(lp).parent in seen:
            continue
        seen.add(Path(lp).parent)
        try:
            manifest = json.loads((Path(lp).parent / MANIFEST).read_text())
        except (OSError, ValueError):
            continue  # shards from another tool: nothing to check
        got = manifest.get("tokenizer_hash") if isinstance(manifest, dict) else None
        if manifest.get("content") == "tokens" and got and got != want:
            raise ValueError(
                f"shards in {Path(lp).parent} were tokenized with tokenizer {got}, but data.tokenizer "
                f"{tokenizer_path} is {want}: point data.tokenizer at the tokenizer.json used by "
                f"mtp-make-shards, or re-make the shards"
            )
