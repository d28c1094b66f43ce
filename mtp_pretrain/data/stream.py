"""One reader's stream: the documents of its shards packed into ``[batch_size, sample_len]`` token batches.

A *reader* is one (data-parallel rank, DataLoader worker) pair; ``num_readers = dp_size * num_workers``
readers share every dataset. Per dataset and epoch, every reader computes the same shuffled shard order
(:func:`~mtp_pretrain.data.datasets.epoch_order`) and reader ``r`` takes ``order[r::num_readers]``: within
an epoch each shard (so each document) belongs to exactly one reader. Each reader moves to its next epoch
on its own when its shards are done (``loop=True``), so training streams never run out.

Packing: a dataset's documents are tokenized, each followed by EOS, concatenated and cut into samples of
exactly ``sample_len`` (= T + n) tokens; leftover tokens carry into the next shard and epoch. Several
datasets are mixed **by samples** with megatron's deterministic blending rule (the next sample comes from
the dataset whose share is furthest below its weight), so the weights are exact token fractions and the
mix needs no RNG state. ``loop=False`` reads one epoch and pads the last sample/batch with PAD instead of
dropping it (nothing is lost: used for validation).

Exact resume: :meth:`PackedBatchStream.state_dict` records per dataset (epoch, shard position, samples
consumed in the current shard, packing buffer), the mix counts and the error counters; after
:meth:`~PackedBatchStream.load_state_dict` the next batches are the ones an uninterrupted stream would have
produced. Only the current shard is re-read (consumed samples are skipped without decoding).

Bad input (``on_error``, see :mod:`mtp_pretrain.data.shard_reader`): ``"skip"`` skips the shard (the rest of
it: documents before a damage are kept) or sample, counts it in :attr:`PackedBatchStream.errors` and logs a
warning naming the shard; ``"raise"`` raises :class:`~mtp_pretrain.data.shard_reader.ShardReadError` naming it
with the skip hint once. A reader whose shards hold no document at all for a whole epoch raises instead of
spinning; so does a one-epoch (validation) reader whose shards were all bad.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mtp_pretrain.data.datasets import Dataset, epoch_order
from mtp_pretrain.data.shard_reader import (
    ERROR_KINDS,
    ON_ERROR,
    SampleError,
    ShardNotFoundError,
    ShardReadError,
    iter_samples,
    local_path,
    sample_tokens,
)
from mtp_pretrain.data.tokenizer import eos_id, load_tokenizer, pad_id
from mtp_pretrain.errors import one_line

log = logging.getLogger(__name__)

# the fix every raised data error names (once): the message itself names the shard and what is wrong
SKIP_HINT = " (data.on_error=skip skips bad shards and samples, counting and logging them)"


def new_cursor() -> dict[str, Any]:
    """A reader's position in one dataset: epoch, shard index in its epoch list, samples consumed in that
    shard, packing buffer, and (after a re-sharded resume) explicit shard lists for some epochs."""
    return {"epoch": 0, "shard_pos": 0, "sample_offset": 0, "buffer": [], "plan": {}}


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
            raise ValueError(
                f"need 0 <= reader < num_readers, got reader={reader}, num_readers={num_readers}"
            )
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
                raise ShardNotFoundError(
                    f"dataset {ds.name!r}: {len(missing)} of {len(ds.urls)} shard(s) not found, e.g. {missing[0]}: "
                    + ("fix its URLs" if len(missing) == len(ds.urls) else f"fix its URLs{SKIP_HINT}")
                )
            for url in missing:
                log.warning("data: shard not found: %s (data.on_error=skip: it will be skipped)", url)
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.eos, self.pad = eos_id(self.tokenizer), pad_id(self.tokenizer)
        self.batch_size, self.sample_len, self.seed = batch_size, sample_len, seed
        self.reader, self.num_readers = reader, num_readers
        self.shuffle_shards, self.loop = shuffle_shards, loop
        self.on_error, self.text_field = on_error, text_field
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
        or the plan a re-sharded resume gave it for that epoch (see
        :func:`~mtp_pretrain.data.reshard.reshard_states`)."""
        plan = self.cursors[dataset].get("plan", {}).get(str(epoch))
        if plan is not None:
            return [(url, int(start)) for url, start in plan]
        order = epoch_order(self.datasets[dataset].urls, self.seed, dataset, epoch, self.shuffle_shards)
        return [(url, 0) for url in order[self.reader :: self.num_readers]]

    # -- reading --------------------------------------------------------------------------------------
    def _bad(self, kind: str, message: str) -> None:
        """Skip (count + warn) or raise bad input, by ``on_error``; ``message`` names it, without a fix."""
        if self.on_error == "raise":
            raise ShardReadError(one_line(message) + SKIP_HINT)
        self.errors[kind] += 1
        log.warning("data: skipping %s", one_line(message))

    def _documents(self, j: int) -> Iterator[list[int]]:
        """Token lists (each ending in EOS) of dataset ``j``; the cursor is updated before each yield."""
        cur = self.cursors[j]
        while True:
            docs_this_pass, errors_before = 0, sum(self.errors.values())
            planned = str(cur["epoch"]) in cur.get("plan", {})
            full_epoch = cur["shard_pos"] == 0 and cur["sample_offset"] == 0 and not planned
            items = self._epoch_items(cur["epoch"], j)
            while cur["shard_pos"] < len(items):
                url, start = items[cur["shard_pos"]]
                cur["sample_offset"] = max(cur["sample_offset"], start)
                samples = iter_samples(url, skip=cur["sample_offset"])
                while True:
                    # only the reading is guarded: an error _bad raises below must not be caught (and its hint
                    # added) a second time as a shard error
                    try:
                        idx, sample = next(samples, (None, None))
                    except ShardReadError as e:
                        self._bad("shards_skipped", str(e))  # the rest of the shard
                        break
                    if idx is None:
                        break
                    if sample is None:
                        continue
                    cur["sample_offset"] = idx + 1
                    try:
                        ids = sample_tokens(sample, self.tokenizer, self.text_field)
                    except SampleError as e:
                        self._bad(
                            "samples_skipped",
                            f"sample {sample.get('__key__')!r} of shard {url}: {e}; fix or remove the sample",
                        )
                        continue
                    if ids:
                        docs_this_pass += 1
                        ids.append(self.eos)
                        yield ids
                cur["shard_pos"] += 1
                cur["sample_offset"] = 0
            # never spin forever on document-less shards; a one-epoch read (validation) whose shards were all
            # bad fails the same way rather than measure nothing (valid shards without documents are fine there)
            bad_pass = self.loop or sum(self.errors.values()) > errors_before
            if full_epoch and docs_this_pass == 0 and items and bad_pass:
                skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.errors.items())
                raise ShardReadError(
                    f"dataset {self.datasets[j].name!r}: the {len(items)} shard(s) reader {self.reader}/"
                    f"{self.num_readers} reads in epoch {cur['epoch']} contain no readable document (e.g. "
                    f"{items[0][0]}; {skipped} so far, each named in a warning above): fix or replace the "
                    f"shards, or set data.text_field if their JSON records keep the text elsewhere"
                )
            if not self.loop:
                return
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
                {
                    **c,
                    "buffer": list(c["buffer"]),
                    "plan": {e: [list(i) for i in p] for e, p in c.get("plan", {}).items()},
                }
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
