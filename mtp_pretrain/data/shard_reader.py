"""Shard URLs and reading one shard: its samples, each decoded to the token ids of one document.

Shards may hold text documents (``<key>.txt``, or ``<key>.json`` with a text field, as any webdataset
tool writes) or pre-tokenized ones (``<key>.tokens.npy``, written by ``mtp-make-shards --tokenizer``).

Bad input (the reader's ``on_error`` policy, one of :data:`ON_ERROR`): a missing, empty, corrupt or
truncated shard, a ``pipe:`` command that fails, or a member that is not UTF-8, a JSON record without the
text field. Reading a shard raises :class:`ShardReadError` naming it; decoding a sample raises
:class:`SampleError`. The stream (:mod:`mtp_pretrain.data.stream`) then skips and counts it under
:data:`ERROR_KINDS`, or raises.

Truncation, one rule for files and ``pipe:`` streams: shards are read as tar *streams* (the same code for
both), and a shard is whole only when its end-of-archive marker is read. At any damage (a cut inside or
between members, a corrupt header, a command that exits non-zero) the samples read before it are kept, the
sample being read is dropped, and the shard raises :class:`ShardReadError` (then counted or raised).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import webdataset as wds
from tokenizers import Tokenizer

from mtp_pretrain.errors import DataError, one_line

ON_ERROR = ("skip", "raise")
TOKENS_MEMBER = "tokens.npy"  # pre-tokenized document: 1-D uint16/uint32 array, no EOS
ERROR_KINDS = ("shards_skipped", "samples_skipped")
REMAKE = "; re-copy or re-make the shard, or drop it from the data"  # the fix a damaged shard's error names


class ShardReadError(DataError):
    """A shard or one of its samples could not be read or decoded; the message names the shard."""


class ShardNotFoundError(ShardReadError, FileNotFoundError):
    """A local shard that does not exist (also a FileNotFoundError, as it was before it was a DataError)."""


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
                    raise ShardNotFoundError(
                        f"shard directory {lp} holds no .tar files: point the URL at the shards"
                    )
                out.extend(found)
            else:
                out.append(url)
    return out


class _Tar(tarfile.TarInfo):
    """A member header that records on its archive how the archive ended: python's tarfile ends the iteration
    silently both at the end-of-archive marker (a zero block) and at a stream that stops short of one (a cut
    at a member boundary, a bad header after the first), so the reader could not tell a whole shard from a
    truncated one."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf.mtp_end = e  # type: ignore[attr-defined]
            raise


_MISSING_MARKER = {
    "EOFHeaderError": None,  # the end-of-archive marker: the shard is whole
    "EmptyHeaderError": "it ends without the end-of-archive marker (truncated at a member boundary)",
    "TruncatedHeaderError": "it ends inside a member header (truncated)",
    "InvalidHeaderError": "a member header is corrupt",
}


class _Source:
    """The byte stream of one shard URL and, for ``pipe:`` URLs, its command, whose exit status is checked:
    a failing command is a :class:`ShardReadError` naming the URL (not just "fewer samples")."""

    def __init__(self, url: str) -> None:
        self.url, self.proc, self._stderr = url, None, None
        local = local_path(url)
        try:
            if local is not None:
                if not Path(local).is_file():
                    raise ShardNotFoundError(f"shard not found: {url}; fix the URL")
                if Path(local).stat().st_size == 0:
                    raise ShardReadError(f"empty shard {url} (0 bytes){REMAKE}")
                self.stream: Any = open(local, "rb")  # noqa: SIM115 (closed by close())
            elif url.startswith("pipe:"):
                self._stderr = tempfile.TemporaryFile()
                # a shell command, as webdataset runs it; its stderr is kept for the error message
                self.proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=self._stderr)
                self.stream = self.proc.stdout
            else:
                self.stream = wds.gopen(url, "rb")
        except ShardReadError:
            raise
        except (OSError, ValueError) as e:
            raise ShardReadError(
                f"cannot open shard {url}: {type(e).__name__}: {one_line(str(e))}; fix the URL"
            ) from e

    def check_command(self, after_damage: bool = False) -> None:
        """Raise :class:`ShardReadError` if the ``pipe:`` command failed. ``after_damage``: the tar stream
        broke off; a command whose output goes on is not the cause (it is stopped by :meth:`close`), one at
        the end of its output gets :data:`_EXIT_WAIT` seconds to report its status."""
        if self.proc is None:
            return
        try:
            if after_damage and self.stream.read(1):
                return
            status = self.proc.wait(timeout=_EXIT_WAIT if after_damage else None)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            return
        if status != 0:
            self._stderr.seek(0)  # type: ignore[union-attr]
            err = one_line(self._stderr.read()[-_STDERR_TAIL:].decode(errors="replace"))  # type: ignore[union-attr]
            raise ShardReadError(
                f"shard command failed: {self.url} exited with status {status}"
                + (f" ({err})" if err else "")
                + "; run the command in a shell to see why"
            )

    def drain(self) -> None:
        """Read a command's output to its end (the archive's padding), so it exits by itself."""
        if self.proc is not None:
            while self.stream.read(1 << 16):
                pass

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # the reader stopped early: the rest of the stream is not wanted
        try:
            self.stream.close()
        except Exception:  # noqa: BLE001 (webdataset's pipes check their status on close: checked above)
            pass
        if self.proc is not None:
            self.proc.wait()
        if self._stderr is not None:
            self._stderr.close()


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)  # what reading a damaged tar stream raises
_STDERR_TAIL = 300  # characters of a failed command's stderr quoted in the error
_EXIT_WAIT = 5.0  # seconds: a command whose output ended early is given this long to report its status


def _samples(src: _Source) -> Iterator[dict[str, Any]]:
    """The samples of a shard's tar stream (any compression): its regular members grouped by key as webdataset
    groups them (so sample numbers, which resume positions count, are webdataset's), each
    ``{"__key__": key, "__url__": url, ext: bytes, ...}``.

    :class:`ShardReadError` at any damage: a corrupt or truncated member or header, or a stream that stops
    before the end-of-archive marker (also when the cut falls exactly on a member boundary). A sample is
    yielded once the next sample's first header has been read, before that member's data: at a damage the
    sample being read is dropped (it may lack members) and every sample before it is kept.
    """
    url, n, current = src.url, 0, None
    try:
        tf = tarfile.open(fileobj=src.stream, mode="r|*", tarinfo=_Tar)
    except _TAR_ERRORS as e:
        raise ShardReadError(
            f"corrupt shard {url}: not a readable tar ({type(e).__name__}: {one_line(str(e))}){REMAKE}"
        ) from None
    while True:
        try:
            info = tf.next()
        except _TAR_ERRORS as e:
            raise ShardReadError(
                f"corrupt shard {url} after {n} sample(s): {type(e).__name__}: {one_line(str(e))}{REMAKE}"
            ) from None
        if info is None:
            break
        tf.members = []  # a stream: don't keep every header
        name = info.name
        if not info.isreg() or "/" not in name and name.startswith("__") and name.endswith("__"):
            continue
        if _SKIP_META.match(name) or (match := _KEY_EXT.match(name)) is None:
            continue
        key, ext = match[1], match[2].lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
                n += 1
            current = {"__key__": key, "__url__": url}
        if ext in current:
            raise ShardReadError(
                f"corrupt shard {url}: member {name} appears twice in sample {key!r}{REMAKE}"
            )
        try:
            current[ext] = tf.extractfile(info).read()  # type: ignore[union-attr]
        except _TAR_ERRORS as e:
            raise ShardReadError(
                f"corrupt shard {url} after {n} sample(s): {type(e).__name__}: {one_line(str(e))}{REMAKE}"
            ) from None
    why = _MISSING_MARKER.get(
        type(getattr(tf, "mtp_end", None)).__name__, "it ends without the end-of-archive marker"
    )
    if why is not None:
        raise ShardReadError(f"corrupt shard {url} after {n} sample(s): {why}{REMAKE}")
    if current is not None:
        yield current


_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's meta members, skipped
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def iter_samples(url: str, skip: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """``(index, sample)`` for the samples of one shard from ``skip`` on (``None`` for skipped ones).

    Damage (see :func:`_samples`) and a failing ``pipe:`` command raise :class:`ShardReadError` naming
    the shard, after the samples read whole before the damage: a local file and the same bytes through
    ``pipe:`` give the same samples and the same error.
    """
    src = _Source(url)
    try:
        idx = 0
        try:
            for sample in _samples(src):
                yield idx, (sample if idx >= skip else None)
                idx += 1
        except ShardReadError:
            src.check_command(after_damage=True)  # a failed command explains the damage: raise that instead
            raise
        src.drain()
        src.check_command()
    finally:
        src.close()


def probe_shard(url: str, max_bytes: int = 1 << 16) -> None:
    """Cheap pre-flight check of a local shard: it exists, is not empty, and is a tar whose first member
    header and up to ``max_bytes`` of that member's data can be read (the rest of the shard is not read).
    :class:`ShardReadError` naming it otherwise; ``pipe:`` and remote URLs are not checked (reading them is
    not cheap)."""
    if local_path(url) is None:
        return
    src = _Source(url)
    try:
        tf = tarfile.open(fileobj=src.stream, mode="r|*")
        info = tf.next()
        if info is not None and info.isreg():
            data = tf.extractfile(info).read(max_bytes)  # type: ignore[union-attr]
            if len(data) < min(info.size, max_bytes):
                raise tarfile.ReadError("unexpected end of data")
    except _TAR_ERRORS as e:
        raise ShardReadError(
            f"corrupt shard {url}: its first member cannot be read ({type(e).__name__}: {one_line(str(e))}){REMAKE}"
        ) from None
    finally:
        src.close()


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
