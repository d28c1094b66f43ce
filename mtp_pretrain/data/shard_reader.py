"""Shard URLs and reading one shard: its samples, each decoded to the token ids of one document.

Shards may hold text documents (``<key>.txt``, or ``<key>.json`` with a text field, as any webdataset
tool writes) or pre-tokenized ones (``<key>.tokens.npy``, written by ``mtp-make-shards --tokenizer``).

Bad input (the reader's ``on_error`` policy, one of :data:`ON_ERROR`): a missing, empty, corrupt or
truncated shard, or a member that is not UTF-8, a JSON record without the text field. Reading a shard
raises :class:`ShardReadError` naming it; decoding a sample raises :class:`SampleError`. The stream
(:mod:`mtp_pretrain.data.stream`) then skips and counts it under :data:`ERROR_KINDS`, or raises.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import webdataset as wds
from tokenizers import Tokenizer

from mtp_pretrain.errors import DataError

ON_ERROR = ("skip", "raise")
TOKENS_MEMBER = "tokens.npy"  # pre-tokenized document: 1-D uint16/uint32 array, no EOS
ERROR_KINDS = ("shards_skipped", "samples_skipped")


class ShardReadError(DataError):
    """A shard or one of its samples could not be read or decoded; the message names the shard."""


class SampleError(ValueError):
    """One sample is unusable (not UTF-8, no text field, no document member)."""


def local_path(url: str) -> str | None:
    """The file path of a local shard URL, or None for remote/``pipe:`` URLs."""
    parsed = urlparse(url)
    return parsed.path if parsed.scheme in ("", "file") else None


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs as webdataset accepts them, expanded: brace patterns (``shard-{000000..000099}.tar``),
    ``::``-joined lists, ``pipe:`` commands; a local directory stands for its ``*.tar`` files (sorted)."""
    out: list[str] = []
    for spec in [urls] if isinstance(urls, str) else urls:
        for url in wds.shardlists.expand_urls(str(spec)):
            lp = local_path(url)
            if lp is not None and Path(lp).is_dir():
                found = sorted(str(p) for p in Path(lp).glob("*.tar"))
                if not found:
                    raise ValueError(f"shard directory {lp} holds no .tar files")
                out.extend(found)
            else:
                out.append(url)
    return out


def _check_tar_trailer(url: str) -> None:
    """Detect a truncated local ``.tar``: python's tarfile silently stops at a cut that falls on a member
    header, so check the POSIX end-of-archive marker (two zero blocks) and the 512-byte block size."""
    local = local_path(url)
    if local is None or not local.endswith(".tar"):
        return
    with open(local, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - 1024))
        tail = fh.read()
    if size == 0:
        raise ShardReadError(f"empty shard {url} (0 bytes)")
    if size % 512 or len(tail) < 1024 or tail.count(0) != len(tail):
        raise ShardReadError(f"corrupt shard {url}: truncated (size {size} bytes; no end-of-archive marker)")


def iter_samples(url: str, skip: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """``(index, sample)`` for the samples of one shard from ``skip`` on (``None`` for skipped ones).

    Any failure to open/read the tar is raised as :class:`ShardReadError` naming the shard.
    """
    local = local_path(url)
    if local is not None and not Path(local).is_file():
        raise ShardReadError(f"shard not found: {url}")
    _check_tar_trailer(url)
    ds = wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    it = iter(ds)
    idx = 0
    while True:
        try:
            sample = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise ShardReadError(
                f"corrupt or unreadable shard {url} (sample #{idx}): {type(e).__name__}: {e}"
            ) from e
        yield idx, (sample if idx >= skip else None)
        idx += 1


def sample_tokens(sample: dict[str, Any], tokenizer: Tokenizer, text_field: str) -> list[int]:
    """The token ids of a sample's document (no EOS): its ``.tokens.npy``, else its encoded text;
    :class:`SampleError` when it holds no usable document."""
    if TOKENS_MEMBER in sample:
        try:
            arr = np.load(io.BytesIO(sample[TOKENS_MEMBER]), allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise SampleError(f"unreadable {TOKENS_MEMBER} ({e})") from None
        if arr.ndim != 1 or arr.dtype.kind not in "ui":
            raise SampleError(f"{TOKENS_MEMBER} is not a 1-D integer array ({arr.dtype}, {arr.shape})")
        return arr.tolist()
    if "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleError(f"text member is not valid UTF-8 ({e})") from None
    elif "json" in sample:
        try:
            rec = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise SampleError(f"invalid JSON member ({e})") from None
        text = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise SampleError(f"JSON record has no string field {text_field!r} (data.text_field)")
    else:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError(f"no document member (.txt, .json or .{TOKENS_MEMBER}; has {members})")
    return tokenizer.encode(text, add_special_tokens=False).ids
