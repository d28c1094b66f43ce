"""Streaming packer: webdataset document shards -> fixed ``[batch_size, seq_len]`` LongTensor batches.

Documents are tokenized, each followed by EOS, concatenated into one token stream and cut into
consecutive, non-overlapping samples of exactly ``seq_len`` tokens (``seq_len`` = T + n for MTP).
``batch_size`` consecutive samples form a batch, i.e. each batch is the next ``batch_size * seq_len``
tokens of the stream. Tokens left over at the end of a shard carry into the next shard (and, with
``loop=True``, into the next epoch).

Shards are assigned to data-parallel ranks by index after a per-epoch shuffle that is identical on
every rank (``random.Random(seed + epoch)``): shard ``order[i]`` belongs to rank ``i % dp_size``.
If ``len(urls)`` is not a multiple of ``dp_size``, ranks see different amounts of data per epoch.

Exact resume: :meth:`PackedBatchStream.state_dict` records (epoch, position in the epoch's shard list,
samples consumed in the current shard, leftover tokens); :meth:`load_state_dict` restores it and the next
batches are the ones an uninterrupted stream would have produced. Only the current shard is re-read
(its consumed samples are skipped without tokenizing).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import webdataset as wds

from mtp_pretrain.data.tokenizer import eos_id, load_tokenizer


class ShardReadError(RuntimeError):
    """A shard could not be read or decoded (corrupt/truncated tar, bad member)."""


def _local_path(url: str) -> str | None:
    parsed = urlparse(url)
    return parsed.path if parsed.scheme in ("", "file") else None


def _sample_text(sample: dict[str, Any]) -> str | None:
    """Text of a webdataset sample: ``.txt`` member, else the ``text`` field of a ``.json`` member."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8")
    if "json" in sample:
        rec = json.loads(sample["json"])
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            return rec["text"]
    return None  # e.g. a sample with other members only; not a document


def _check_tar_trailer(url: str) -> None:
    """Detect a truncated local ``.tar``: python's tarfile silently stops at a cut that falls on a member
    header, so check the POSIX end-of-archive marker (two zero blocks) and the 512-byte block size."""
    local = _local_path(url)
    if local is None or not local.endswith(".tar"):
        return
    with open(local, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - 1024))
        tail = fh.read()
    if size % 512 or len(tail) < 1024 or tail.count(0) != len(tail):
        raise ShardReadError(f"corrupt shard {url}: truncated (size {size} bytes; no end-of-archive marker)")


def iter_shard_texts(url: str, skip: int = 0) -> Iterator[tuple[int, str | None]]:
    """Yield ``(sample_index, text_or_None)`` for the samples of one shard, starting at ``skip``.

    Errors while reading/decoding are raised as :class:`ShardReadError` naming the shard.
    """
    _check_tar_trailer(url)
    ds = wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    it = iter(ds)
    idx = 0
    while True:
        try:
            sample = next(it)
            text = _sample_text(sample) if idx >= skip else None
        except StopIteration:
            return
        except Exception as e:
            raise ShardReadError(
                f"corrupt or unreadable shard {url} (sample #{idx}): {type(e).__name__}: {e}"
            ) from e
        if idx >= skip:
            yield idx, text
        idx += 1


class PackedBatchStream:
    """Infinite (``loop=True``) or one-epoch iterator of packed ``[batch_size, seq_len]`` token batches.

    ``iter(stream)`` returns the stream itself; batches are produced by ``next(stream)``. Iteration
    happens in the calling process (no workers).
    """

    def __init__(
        self,
        urls: Sequence[str],
        tokenizer_path: str | Path,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle_shards: bool = True,
        loop: bool = True,
    ) -> None:
        self.urls = [str(u) for u in urls]
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if len(self.urls) < dp_size:
            raise ValueError(
                f"{len(self.urls)} shard(s) for dp_size={dp_size} ranks: every data-parallel "
                f"rank needs at least one shard (write more, smaller shards)"
            )
        for url in self.urls:
            local = _local_path(url)
            if local is not None and not Path(local).is_file():
                raise FileNotFoundError(f"shard not found: {url}")
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.eos = eos_id(self.tokenizer)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle_shards, self.loop = shuffle_shards, loop
        # resumable position
        self.epoch = 0
        self.shard_pos = 0  # index into epoch_shards(epoch)
        self.sample_offset = 0  # samples of the current shard already consumed
        self.buffer: list[int] = []  # tokens read but not yet yielded
        self.batches_yielded = 0
        self._gen: Iterator[torch.Tensor] | None = None

    def epoch_shards(self, epoch: int) -> list[str]:
        """The shards this rank reads in ``epoch``, in order."""
        order = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed + epoch).shuffle(order)
        return order[self.dp_rank :: self.dp_size]

    def __iter__(self) -> PackedBatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self._gen is None:
            self._gen = self._generate()
        return next(self._gen)

    def _generate(self) -> Iterator[torch.Tensor]:
        n = self.batch_size * self.seq_len
        while True:
            full_epoch = self.shard_pos == 0 and self.sample_offset == 0
            tokens_this_pass = 0
            shards = self.epoch_shards(self.epoch)
            while self.shard_pos < len(shards):
                while len(self.buffer) >= n:  # state is consistent at every yield
                    yield self._pop_batch(n)
                for idx, text in iter_shard_texts(shards[self.shard_pos], skip=self.sample_offset):
                    if text:
                        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
                        self.buffer.extend(ids)
                        self.buffer.append(self.eos)
                        tokens_this_pass += len(ids) + 1
                    self.sample_offset = idx + 1
                    while len(self.buffer) >= n:
                        yield self._pop_batch(n)
                self.shard_pos += 1
                self.sample_offset = 0
            if not self.loop:
                return  # the partial last batch is dropped
            if full_epoch and tokens_this_pass == 0:  # never spin forever on document-less shards
                raise ValueError(
                    f"rank {self.dp_rank}: the shards of epoch {self.epoch} contain no documents "
                    f"({len(shards)} shards: {shards[:3]}...)"
                )
            self.epoch += 1
            self.shard_pos = 0

    def _pop_batch(self, n: int) -> torch.Tensor:
        batch = torch.tensor(self.buffer[:n], dtype=torch.long).view(self.batch_size, self.seq_len)
        del self.buffer[:n]
        self.batches_yielded += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch returned by ``next``; plain ints and lists only."""
        return {
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "sample_offset": self.sample_offset,
            "buffer": list(self.buffer),
            "batches_yielded": self.batches_yielded,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_shards": len(self.urls),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; requires the same shards, seed and data-parallel layout."""
        for k in ("seed", "dp_rank", "dp_size", "num_shards"):
            mine = len(self.urls) if k == "num_shards" else getattr(self, k)
            if k in state and state[k] != mine:
                raise ValueError(
                    f"cannot resume data stream: state has {k}={state[k]}, this stream has {mine}"
                )
        self.epoch = int(state["epoch"])
        self.shard_pos = int(state["shard_pos"])
        self.sample_offset = int(state["sample_offset"])
        self.buffer = [int(t) for t in state["buffer"]]
        self.batches_yielded = int(state.get("batches_yielded", 0))
        self._gen = None
