"""The embedded default corpus: the running interpreter's Python standard library (or given sources).

``prepare_corpus`` builds ``tokenizer.json`` + train/val shards once into
``cache_dir/<hash of the build inputs>/`` and reuses them afterwards. A build happens in a temporary
directory that is renamed into place only after its ``corpus.json`` manifest has been written, so a
directory with a manifest is always complete (an interrupted build leaves only a ``.tmp`` directory).
The cache key covers the resolved source paths and build options, not the sources' contents: delete the
cache directory after editing the sources.

The documents are held in memory during the build: meant for small/medium corpora (the stdlib is ~11 MB).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtp_pretrain.data.shards import DEFAULT_EXCLUDE_DIRS, iter_source_documents, write_shards
from mtp_pretrain.data.tokenizer import train_tokenizer
from mtp_pretrain.errors import DataError

CORPUS_FORMAT = 1
MANIFEST = "corpus.json"
STDLIB_EXCLUDE_DIRS = (*DEFAULT_EXCLUDE_DIRS, "site-packages", "dist-packages", "test", "tests", "idlelib")
# Above this many bytes of text, the tokenizer is trained on a deterministic pseudo-random subset.
TOKENIZER_TRAIN_MAX_BYTES = 64 * 2**20


@dataclass
class Corpus:
    train_urls: list[str]
    val_urls: list[str]
    tokenizer_path: Path
    num_docs: int
    num_tokens: int | None  # tokens per epoch incl. one EOS per document


def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _log(msg: str) -> None:
    print(f"corpus: {msg}", flush=True)


def _cache_key(
    sources: list[str],
    vocab_size: int,
    max_docs_per_shard: int,
    suffixes: Sequence[str],
    exclude: Sequence[str],
) -> str:
    spec = {
        "format": CORPUS_FORMAT,
        "sources": sources,
        "vocab_size": vocab_size,
        "max_docs_per_shard": max_docs_per_shard,
        "suffixes": list(suffixes),
        "exclude": list(exclude),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _read_manifest(d: Path) -> dict[str, Any] | None:
    """The manifest if ``d`` holds a complete build, else None."""
    try:
        m = json.loads((d / MANIFEST).read_text())
        files = [d / "tokenizer.json", *(d / s for s in m["shards"])]
        if m.get("format") == CORPUS_FORMAT and all(f.is_file() for f in files):
            return m
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _training_texts(texts: list[str], keys: list[str]) -> list[str]:
    total = sum(len(t) for t in texts)
    if total <= TOKENIZER_TRAIN_MAX_BYTES:
        return texts
    order = sorted(range(len(texts)), key=lambda i: hashlib.sha1(keys[i].encode()).digest())
    subset, size = [], 0
    for i in order:
        if size >= TOKENIZER_TRAIN_MAX_BYTES:
            break
        subset.append(i)
        size += len(texts[i])
    _log(f"training tokenizer on {len(subset)}/{len(texts)} docs ({size / 2**20:.0f} MiB)")
    return [texts[i] for i in sorted(subset)]


def _build(
    tmp: Path,
    sources: list[Path],
    vocab_size: int,
    max_docs_per_shard: int,
    suffixes: Sequence[str],
    exclude: Sequence[str],
    spec: dict[str, Any],
) -> dict[str, Any]:
    t0 = time.perf_counter()
    stats: dict[str, int] = {}
    docs = list(iter_source_documents(sources, suffixes=suffixes, exclude_dirs=exclude, stats=stats))
    texts = [d["text"] for d in docs]
    n_bytes = sum(len(t.encode()) for t in texts)
    skipped = {k: v for k, v in stats.items() if k.startswith("skipped")}
    _log(
        f"{len(docs)} docs ({n_bytes / 2**20:.1f} MiB) from {', '.join(map(str, sources))}"
        + (f", skipped {skipped}" if skipped else "")
        + f" in {time.perf_counter() - t0:.1f}s"
    )

    t = time.perf_counter()
    tok = train_tokenizer(
        _training_texts(texts, [d["key"] for d in docs]), vocab_size, tmp / "tokenizer.json"
    )
    _log(f"tokenizer trained (vocab {tok.get_vocab_size()}) in {time.perf_counter() - t:.1f}s")

    t = time.perf_counter()
    num_tokens = len(docs) + sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    rate = n_bytes / max(num_tokens, 1)
    _log(f"{num_tokens} tokens ({rate:.2f} bytes/token) in {time.perf_counter() - t:.1f}s")

    t = time.perf_counter()
    shards = write_shards(docs, tmp, max_docs_per_shard=max_docs_per_shard)
    _log(f"wrote {len(shards)} shards in {time.perf_counter() - t:.1f}s")
    manifest = {
        **spec,
        "shards": [p.name for p in shards],
        "num_docs": len(docs),
        "num_tokens": num_tokens,
        "num_bytes": n_bytes,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    fd, mtmp = tempfile.mkstemp(dir=tmp, prefix=".manifest.")
    with os.fdopen(fd, "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.chmod(mtmp, 0o644)
    os.chmod(tmp, 0o755)  # mkstemp/mkdtemp create private files; the cache may be shared
    os.replace(mtmp, tmp / MANIFEST)  # written last: its presence marks a complete build
    return manifest


def prepare_corpus(
    source_paths: Sequence[str | Path] | None,
    cache_dir: str | Path,
    vocab_size: int,
    val_shards: int = 1,
    max_docs_per_shard: int = 64,
    suffixes: Sequence[str] = (".py",),
) -> Corpus:
    """Build (first call) or reuse (later calls) tokenizer + shards; split the shards into train/val.

    ``source_paths=None`` means the standard library of the running interpreter, without
    ``site-packages``, ``test``/``tests``, ``idlelib`` and ``__pycache__`` directories. The last
    ``val_shards`` shards (sorted) are the validation split. The default ``max_docs_per_shard=64`` gives
    ~11 shards for the ~670 stdlib modules, so the validation shard is ~10% of the data and several
    data-parallel ranks each get a training shard.
    """
    if val_shards < 0:
        raise ValueError(f"val_shards must be >= 0, got {val_shards}")
    if source_paths is None:
        sources, exclude = [stdlib_path()], STDLIB_EXCLUDE_DIRS
    else:
        sources, exclude = [Path(p) for p in source_paths], DEFAULT_EXCLUDE_DIRS
        if not sources:
            raise ValueError("prepare_corpus: source_paths is empty (pass None for the standard library)")
    for p in sources:
        if not p.exists():
            raise DataError(f"data.source path does not exist: {p}; name an existing directory or file")
    resolved = [str(p.resolve()) for p in sources]
    key = _cache_key(resolved, vocab_size, max_docs_per_shard, suffixes, exclude)
    spec = {
        "format": CORPUS_FORMAT,
        "sources": resolved,
        "vocab_size": vocab_size,
        "max_docs_per_shard": max_docs_per_shard,
        "suffixes": list(suffixes),
    }
    root = Path(cache_dir)
    final = root / key

    manifest = _read_manifest(final)
    if manifest is not None:
        _log(f"reusing {final} ({manifest['num_docs']} docs, {len(manifest['shards'])} shards)")
    else:
        root.mkdir(parents=True, exist_ok=True)
        _log(f"building {final}")
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.tmp-"))
        try:
            try:
                manifest = _build(tmp, sources, vocab_size, max_docs_per_shard, suffixes, exclude, spec)
            except (ValueError, OSError, EOFError) as e:  # a source without documents, a cut .gz, ...
                raise DataError(f"data.source: {e}") from None
            if _read_manifest(final) is None:  # nobody else finished meanwhile
                if final.exists():
                    shutil.rmtree(final)  # incomplete leftover
                try:
                    os.rename(tmp, final)
                except OSError:  # lost a race against a concurrent builder
                    if _read_manifest(final) is None:
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest = _read_manifest(final)
        if manifest is None:  # pragma: no cover
            raise RuntimeError(f"corpus build in {final} did not complete")
        _log(f"ready at {final}")

    shard_urls = [str(final / s) for s in sorted(manifest["shards"])]
    if len(shard_urls) < val_shards + 1:
        raise ValueError(
            f"corpus has {len(shard_urls)} shard(s) but val_shards={val_shards} needs at least "
            f"{val_shards + 1}: lower max_docs_per_shard (now {max_docs_per_shard}) or val_shards"
        )
    n_train = len(shard_urls) - val_shards
    return Corpus(
        train_urls=shard_urls[:n_train],
        val_urls=shard_urls[n_train:],
        tokenizer_path=final / "tokenizer.json",
        num_docs=int(manifest["num_docs"]),
        num_tokens=manifest.get("num_tokens"),
    )
