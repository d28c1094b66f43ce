"""One reader's stream: webdataset shards -> documents -> packed ``[batch_size, sample_len]`` token batches.

A *reader* is one (data-parallel rank, DataLoader worker) pair; ``num_readers = dp_size * num_workers``
readers share every dataset. Per dataset and epoch, the shard list is shuffled with the same seeded RNG on
every reader and reader ``r`` takes ``order[r::num_readers]``: within an epoch each shard (so each
document) belongs to exactly one reader. Each reader moves to its next epoch on its own when its shards are
done (``loop=True``), so training streams never run out.

Packing: a dataset's documents are tokenized, each followed by EOS, concatenated and cut into samples of
exactly ``sample_len`` (= T + n) tokens; leftover tokens carry into the next shard and epoch. Several
datasets are mixed **by samples** with megatron's deterministic blending rule (the next sample comes from
the dataset whose share is furthest below its weight), so the weights are exact token fractions and the
mix needs no RNG state. ``loop=False`` reads one epoch and pads the last sample/batch with PAD instead of
dropping it (nothing is lost: used for validation).

Shards may hold text documents (``<key>.txt``, or ``<key>.json`` with a text field, as any webdataset
tool writes) or pre-tokenized ones (``<key>.tokens.npy``, written by ``mtp-make-shards --tokenizer``).

Exact resume: :meth:`PackedBatchStream.state_dict` records per dataset (epoch, shard position, samples
consumed in the current shard, packing buffer), the mix counts and the error counters; after
:meth:`~PackedBatchStream.load_state_dict` the next batches are the ones an uninterrupted stream would have
produced. Only the current shard is re-read (consumed samples are skipped without decoding).

Bad input (``on_error``): a missing, empty, corrupt or truncated shard, a member that is not UTF-8, a JSON
record without the text field. ``"skip"`` skips the shard (rest of it) or sample, counts it in
:attr:`PackedBatchStream.errors` and logs a warning naming the shard; ``"raise"`` raises
:class:`ShardReadError` naming it. A reader whose shards hold no document at all for a whole epoch raises
instead of spinning.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds

from mtp_pretrain.data.tokenizer import eos_id, load_tokenizer, pad_id

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")
TOKENS_MEMBER = "tokens.npy"  # pre-tokenized document: 1-D uint16/uint32 array, no EOS
ERROR_KINDS = ("shards_skipped", "samples_skipped")


class ShardReadError(RuntimeError):
    """A shard or one of its samples could not be read or decoded; the message names the shard."""


class _SampleError(ValueError):
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


@dataclass(frozen=True)
class Dataset:
    """One dataset of a mix: its shard URLs and its share of the training samples."""

    urls: tuple[str, ...]
    weight: float = 1.0
    name: str = "data"

    @classmethod
    def of(cls, urls: str | Sequence[str], weight: float = 1.0, name: str = "data") -> Dataset:
        expanded = expand_urls(urls)
        if not expanded:
            raise ValueError(f"dataset {name!r} has no shard URLs")
        if not weight > 0:
            raise ValueError(f"dataset {name!r}: weight must be > 0, got {weight}")
        return cls(tuple(expanded), float(weight), name)


def epoch_order(urls: Sequence[str], seed: int, dataset: int, epoch: int, shuffle: bool = True) -> list[str]:
    """The shard order of ``epoch`` of dataset number ``dataset``: the same on every reader."""
    order = list(urls)
    if shuffle:
        random.Random(f"{seed}/{dataset}/{epoch}").shuffle(order)
    return order


def new_cursor() -> dict[str, Any]:
    """A reader's position in one dataset: epoch, shard index in its epoch list, samples consumed in that
    shard, packing buffer, and (after a re-sharded resume) explicit shard lists for some epochs."""
    return {"epoch": 0, "shard_pos": 0, "sample_offset": 0, "buffer": [], "plan": {}}


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


def _iter_samples(url: str, skip: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
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


class PackedBatchStream:
    """Iterator of packed ``[batch_size, sample_len]`` LongTensor batches for reader ``reader``.

    ``datasets``: shard URLs (one dataset) or :class:`Dataset` objects (a weighted mix). Iteration happens
    in the calling process; :mod:`mtp_pretrain.data.loader` runs several of these in DataLoader workers.
    """

    def __init__(
        self,
        datasets: Sequence[str] | Sequence[Dataset],
        tokenizer_path: str | Path,
        batch_size: int,
        sample_len: int,
        seed: int = 0,
        reader: int = 0,
        num_readers: int = 1,
        shuffle_shards: bool = True,
        loop: bool = True,
        on_error: str = "skip",
        text_field: str = "text",
    ) -> None:
        self.datasets: list[Dataset] = (
            list(datasets)  # type: ignore[arg-type]
            if datasets and isinstance(datasets[0], Dataset)
            else [Dataset.of(list(datasets))]  # type: ignore[arg-type]
        )
        if batch_size < 1 or sample_len < 1:
            raise ValueError(f"batch_size and sample_len must be >= 1, got {batch_size}, {sample_len}")
        if not 0 <= reader < num_readers:
            raise ValueError(f"need 0 <= reader < num_readers, got reader={reader}, num_readers={num_readers}")
        if on_error not in ON_ERROR:
            raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {on_error!r}")
        for ds in self.datasets:
            if loop and len(ds.urls) < num_readers:
                raise ValueError(
                    f"dataset {ds.name!r} has {len(ds.urls)} shard(s) for {num_readers} readers "
                    f"(data-parallel ranks x data.num_workers): every reader needs at least one shard; "
                    f"write more, smaller shards or lower data.num_workers"
                )
            missing = [u for u in ds.urls if (lp := local_path(u)) is not None and not Path(lp).is_file()]
            if missing and (on_error == "raise" or len(missing) == len(ds.urls)):
                raise FileNotFoundError(
                    f"dataset {ds.name!r}: {len(missing)} of {len(ds.urls)} shard(s) not found, e.g. {missing[0]}"
                    + (" (data.on_error=skip skips missing ones)" if len(missing) < len(ds.urls) else "")
                )
            for url in missing:
                log.warning("shard not found: %s (data.on_error=skip: it will be skipped)", url)
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.eos, self.pad = eos_id(self.tokenizer), pad_id(self.tokenizer)
        self.batch_size, self.sample_len, self.seed = batch_size, sample_len, seed
        self.reader, self.num_readers = reader, num_readers
        self.shuffle_shards, self.loop, self.on_error, self.text_field = shuffle_shards, loop, on_error, text_field
        total = sum(d.weight for d in self.datasets)
        self.weights = [d.weight / total for d in self.datasets]
        # resumable position, per dataset
        self.cursors = [new_cursor() for _ in self.datasets]
        self.samples_per_dataset = [0] * len(self.datasets)
        self.batches_yielded = 0
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self._docs: list[Iterator[list[int]] | None] = [None] * len(self.datasets)
        self._exhausted = [False] * len(self.datasets)

    # -- shard assignment -----------------------------------------------------------------------------
    def epoch_shards(self, epoch: int, dataset: int = 0) -> list[str]:
        """The shards this reader reads in ``epoch`` of ``dataset``, in order."""
        return [url for url, _ in self._epoch_items(epoch, dataset)]

    def _epoch_items(self, epoch: int, dataset: int) -> list[tuple[str, int]]:
        """``(shard, first sample)`` this reader reads in ``epoch``: its deal of the epoch's shuffled shards,
        or the plan a re-sharded resume gave it for that epoch (see :func:`reshard_states`)."""
        plan = self.cursors[dataset].get("plan", {}).get(str(epoch))
        if plan is not None:
            return [(url, int(start)) for url, start in plan]
        order = epoch_order(self.datasets[dataset].urls, self.seed, dataset, epoch, self.shuffle_shards)
        return [(url, 0) for url in order[self.reader :: self.num_readers]]

    # -- decoding -------------------------------------------------------------------------------------
    def _sample_tokens(self, sample: dict[str, Any]) -> list[int]:
        if TOKENS_MEMBER in sample:
            try:
                arr = np.load(io.BytesIO(sample[TOKENS_MEMBER]), allow_pickle=False)
            except (ValueError, EOFError, OSError) as e:
                raise _SampleError(f"unreadable {TOKENS_MEMBER} ({e})") from None
            if arr.ndim != 1 or arr.dtype.kind not in "ui":
                raise _SampleError(f"{TOKENS_MEMBER} is not a 1-D integer array ({arr.dtype}, {arr.shape})")
            return arr.tolist()
        if "txt" in sample:
            try:
                text = sample["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise _SampleError(f"text member is not valid UTF-8 ({e})") from None
        elif "json" in sample:
            try:
                rec = json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError) as e:
                raise _SampleError(f"invalid JSON member ({e})") from None
            text = rec.get(self.text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise _SampleError(f"JSON record has no string field {self.text_field!r} (data.text_field)")
        else:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise _SampleError(f"no document member (.txt, .json or .{TOKENS_MEMBER}; has {members})")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _bad(self, kind: str, message: str) -> None:
        if self.on_error == "raise":
            raise ShardReadError(f"{message} (data.on_error=skip skips it)")
        self.errors[kind] += 1
        log.warning("data: skipping %s", message)

    def _documents(self, j: int) -> Iterator[list[int]]:
        """Token lists (each ending in EOS) of dataset ``j``; the cursor is updated before each yield."""
        cur = self.cursors[j]
        while True:
            docs_this_pass = 0
            planned = str(cur["epoch"]) in cur.get("plan", {})
            full_epoch = cur["shard_pos"] == 0 and cur["sample_offset"] == 0 and not planned
            items = self._epoch_items(cur["epoch"], j)
            while cur["shard_pos"] < len(items):
                url, start = items[cur["shard_pos"]]
                cur["sample_offset"] = max(cur["sample_offset"], start)
                try:
                    for idx, sample in _iter_samples(url, skip=cur["sample_offset"]):
                        if sample is None:
                            continue
                        cur["sample_offset"] = idx + 1
                        try:
                            ids = self._sample_tokens(sample)
                        except _SampleError as e:
                            self._bad("samples_skipped", f"sample {sample.get('__key__')!r} of shard {url}: {e}")
                            continue
                        if ids:
                            docs_this_pass += 1
                            ids.append(self.eos)
                            yield ids
                except ShardReadError as e:
                    self._bad("shards_skipped", str(e))
                cur["shard_pos"] += 1
                cur["sample_offset"] = 0
            if not self.loop:
                return
            if full_epoch and docs_this_pass == 0:  # never spin forever on document-less shards
                raise ShardReadError(
                    f"reader {self.reader}/{self.num_readers}: the shards of epoch {cur['epoch']} of dataset "
                    f"{self.datasets[j].name!r} contain no readable document ({len(items)} shards: "
                    f"{[u for u, _ in items[:3]]}...; skipped so far: {self.errors})"
                )
            cur.get("plan", {}).pop(str(cur["epoch"]), None)
            cur["epoch"] += 1
            cur["shard_pos"] = 0

    # -- packing --------------------------------------------------------------------------------------
    def _next_sample(self, j: int) -> list[int] | None:
        """The next ``sample_len`` tokens of dataset ``j`` (PAD-filled at the end of a one-epoch stream)."""
        buf = self.cursors[j]["buffer"]
        if self._docs[j] is None:
            self._docs[j] = self._documents(j)
        while len(buf) < self.sample_len:
            doc = next(self._docs[j], None)  # type: ignore[arg-type]
            if doc is None:  # only with loop=False
                self._exhausted[j] = True
                if not buf:
                    return None
                sample = buf + [self.pad] * (self.sample_len - len(buf))
                buf.clear()
                return sample
            buf.extend(doc)
        sample = buf[: self.sample_len]
        del buf[: self.sample_len]
        return sample

    def _pick_dataset(self) -> int:
        # megatron's blending rule: the dataset furthest below its share of the samples so far
        k = sum(self.samples_per_dataset) + 1
        live = [j for j in range(len(self.datasets)) if not self._exhausted[j]]
        return max(live, key=lambda j: (self.weights[j] * k - self.samples_per_dataset[j], -j))

    def __iter__(self) -> PackedBatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        rows: list[list[int]] = []
        while len(rows) < self.batch_size and not all(self._exhausted):
            j = self._pick_dataset()
            sample = self._next_sample(j)
            if sample is not None:
                rows.append(sample)
                self.samples_per_dataset[j] += 1
        if not rows:
            raise StopIteration
        rows += [[self.pad] * self.sample_len] * (self.batch_size - len(rows))
        self.batches_yielded += 1
        return torch.tensor(rows, dtype=torch.long)

    # -- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch returned by ``next``; plain ints, strings and lists only."""
        return {
            "cursors": [
                {**c, "buffer": list(c["buffer"]), "plan": {e: [list(i) for i in p] for e, p in c.get("plan", {}).items()}}
                for c in self.cursors
            ],
            "samples_per_dataset": list(self.samples_per_dataset),
            "batches_yielded": self.batches_yielded,
            "errors": dict(self.errors),
            "seed": self.seed,
            "reader": self.reader,
            "num_readers": self.num_readers,
            "num_shards": [len(d.urls) for d in self.datasets],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; requires the same datasets, seed and reader layout."""
        mine = {
            "seed": self.seed,
            "reader": self.reader,
            "num_readers": self.num_readers,
            "num_shards": [len(d.urls) for d in self.datasets],
        }
        for k, v in mine.items():
            if k in state and state[k] != v:
                raise ValueError(f"cannot resume data stream: state has {k}={state[k]}, this stream has {v}")
        self.cursors = [
            {
                "epoch": int(c["epoch"]),
                "shard_pos": int(c["shard_pos"]),
                "sample_offset": int(c["sample_offset"]),
                "buffer": [int(t) for t in c["buffer"]],
                "plan": {str(e): [[str(u), int(k)] for u, k in p] for e, p in c.get("plan", {}).items()},
            }
            for c in state["cursors"]
        ]
        self.samples_per_dataset = [int(x) for x in state["samples_per_dataset"]]
        self.batches_yielded = int(state["batches_yielded"])
        self.errors = {k: int(state["errors"].get(k, 0)) for k in ERROR_KINDS}
        self._docs = [None] * len(self.datasets)
        self._exhausted = [False] * len(self.datasets)


def reshard_states(
    old: Sequence[dict[str, Any] | None],
    new_readers: int,
    datasets: Sequence[Dataset],
    seed: int,
    shuffle_shards: bool = True,
) -> list[dict[str, Any]]:
    """Reader states for ``new_readers`` readers that continue where ``old`` readers (indexed by reader
    number; None = never handed out a batch) stopped, when data-parallel size or worker count changed.

    The rule, per dataset: let ``e0``/``e1`` be the lowest/highest epoch any old reader is in. For every
    epoch ``e0 <= e <= e1`` the work nobody has read yet (the rest of each old reader's current shard from its
    sample offset, its unread shards, and the whole share of readers that had not reached ``e``) is listed
    in old-reader order and dealt ``items[r::new_readers]``; later epochs are dealt as usual. The old packing
    buffers (tokens read but not yet trained on) go to new reader ``r % new_readers``, in front. So no
    document is repeated or skipped; only the position in the document order changes. Mixing counts restart.
    """
    num_old = len(old)
    states: list[dict[str, Any]] = [
        {"cursors": [new_cursor() for _ in datasets], "samples_per_dataset": [0] * len(datasets),
         "batches_yielded": 0, "errors": dict.fromkeys(ERROR_KINDS, 0), "seed": seed, "reader": r,
         "num_readers": new_readers, "num_shards": [len(d.urls) for d in datasets]}
        for r in range(new_readers)
    ]  # fmt: skip
    for k in ERROR_KINDS:
        states[0]["errors"][k] = sum(int(st["errors"].get(k, 0)) for st in old if st)
    for j, ds in enumerate(datasets):
        cursors = [st["cursors"][j] if st else new_cursor() for st in old]

        def items_of(r: int, epoch: int) -> list[list]:
            plan = cursors[r].get("plan", {}).get(str(epoch))  # noqa: B023 (used within this iteration)
            if plan is not None:
                return [[u, int(k)] for u, k in plan]
            order = epoch_order(ds.urls, seed, j, epoch, shuffle_shards)  # noqa: B023
            return [[u, 0] for u in order[r::num_old]]

        first, last = min(c["epoch"] for c in cursors), max(c["epoch"] for c in cursors)
        for epoch in range(first, last + 1):
            todo: list[list] = []
            for r, c in enumerate(cursors):
                if c["epoch"] > epoch:
                    continue
                mine = items_of(r, epoch)
                if c["epoch"] == epoch:
                    mine = mine[c["shard_pos"] :]
                    if mine:
                        mine[0] = [mine[0][0], max(mine[0][1], int(c["sample_offset"]))]
                todo += mine
            for r in range(new_readers):
                states[r]["cursors"][j]["plan"][str(epoch)] = todo[r::new_readers]
        for r in range(new_readers):
            states[r]["cursors"][j]["epoch"] = first
        for r, c in enumerate(cursors):
            states[r % new_readers]["cursors"][j]["buffer"] += [int(t) for t in c["buffer"]]
    return states
