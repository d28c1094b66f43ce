"""The training batches of one data-parallel rank, read by ``num_workers`` DataLoader workers, resumable.

Worker ``w`` of DP rank ``d`` runs the reader stream ``d * num_workers + w`` of ``dp_size * num_workers``
(:class:`~mtp_pretrain.data.stream.PackedBatchStream`). Tensor/pipeline-parallel peers of a DP rank build
identical loaders, so they see identical batches. torch's DataLoader returns the batches of an
``IterableDataset`` strictly round-robin over its workers, so batch ``k`` comes from worker ``k % W``.

Exact resume with workers: workers run ahead (prefetch), so their own position is not the position of the
training loop. Every batch therefore travels with its reader's state *after* that batch; the loader keeps
the state of the last batch it handed out per reader plus which reader is next. A resumed loader restarts
each reader from its state and rotates the worker -> reader mapping so the round-robin continues where it
stopped. (torchdata's StatefulDataLoader does the same bookkeeping but copies torch's private DataLoader
internals and pins torch versions; this is the few lines we need.)

Bad data (:class:`~mtp_pretrain.errors.MTPError`, e.g. a shard under ``data.on_error=raise``) raised in a
worker reaches the training process as the same one-line error it is without workers, not wrapped in
torch's multi-line "Caught ... in DataLoader worker process" re-raise.
"""

from __future__ import annotations

import os
import signal
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtp_pretrain.data.datasets import Dataset
from mtp_pretrain.data.reshard import reshard_states
from mtp_pretrain.data.shard_reader import ERROR_KINDS
from mtp_pretrain.data.stream import PackedBatchStream
from mtp_pretrain.errors import DataError, MTPError, one_line
from mtp_pretrain.processes import die_with_parent


@dataclass(frozen=True)
class ReaderSpec:
    """Everything a worker needs to build its reader stream (picklable: no open files or iterators)."""

    datasets: tuple[Dataset, ...]
    tokenizer_path: str
    batch_size: int
    sample_len: int
    seed: int
    dp_rank: int
    dp_size: int
    readers_per_rank: int
    on_error: str
    text_field: str

    def stream(self, local: int) -> PackedBatchStream:
        """The stream of this rank's ``local``-th reader."""
        w = self.readers_per_rank
        return PackedBatchStream(
            self.datasets,
            self.tokenizer_path,
            self.batch_size,
            self.sample_len,
            seed=self.seed,
            reader=self.dp_rank * w + local,
            num_readers=self.dp_size * w,
            loop=True,
            on_error=self.on_error,
            text_field=self.text_field,
        )


@dataclass(frozen=True)
class _Failure:
    """An expected failure (bad data) in a worker, shipped to the training process as an item: torch would
    re-raise it there wrapped in a multi-line "Caught ... in DataLoader worker process" message."""

    error: type[MTPError]
    message: str

    def rebuild(self) -> MTPError:
        try:
            return self.error(self.message)
        except Exception:  # noqa: BLE001 (a class with another signature: the message is what matters)
            return DataError(self.message)


class _Readers(IterableDataset):
    """In each worker: that worker's reader stream, yielding (batch, local reader index, reader state), or
    a :class:`_Failure` as its last item."""

    def __init__(self, spec: ReaderSpec, rotation: int, states: dict[int, dict[str, Any]]) -> None:
        self.spec, self.rotation, self.states = spec, rotation, states

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, dict[str, Any]]]:
        info = get_worker_info()
        local = ((info.id if info is not None else 0) + self.rotation) % self.spec.readers_per_rank
        try:
            stream = self.spec.stream(local)
            if local in self.states:
                stream.load_state_dict(self.states[local])
            for batch in stream:
                yield batch, local, stream.state_dict()
        except MTPError as e:
            if info is None:  # in the training process itself: the error as it is
                raise
            yield _Failure(type(e), one_line(str(e)))


def _shutdown_workers(it: Any, owner: int) -> None:
    # only in the process that started the workers: a forked worker of another loader inherits this
    # finalizer, and torch's shutdown asserts it runs in the workers' parent
    if os.getpid() == owner:
        it._shutdown_workers()


def _as_is(item: Any) -> Any:
    return item


def _init_worker(_worker_id: int) -> None:
    # A preemption signal sent to the whole process group must reach the trainer only: a worker that died
    # of it would take the training process down before it can save (the trainer stops the workers itself).
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # ... but when the trainer itself is killed (SIGKILL, OOM killer), its workers must not outlive it: an
    # orphaned worker blocks forever flushing its prefetch queue.
    die_with_parent()


class BatchLoader:
    """Infinite iterator of ``[batch_size, sample_len]`` token batches for DP rank ``dp_rank``."""

    def __init__(
        self,
        datasets: Sequence[Dataset],
        tokenizer_path: str | Path,
        batch_size: int,
        sample_len: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 1,
        on_error: str = "skip",
        text_field: str = "text",
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.spec = ReaderSpec(
            tuple(datasets),
            str(tokenizer_path),
            batch_size,
            sample_len,
            seed,
            dp_rank,
            dp_size,
            max(num_workers, 1),
            on_error,
            text_field,
        )
        self._states: dict[int, dict[str, Any]] = {}
        self._next_reader = 0
        self._it: Iterator | None = None
        self._loader: DataLoader | None = None
        self._shutdown: weakref.finalize | None = None
        self.spec.stream(0)  # fail early (shard counts, missing files, tokenizer) in this process

    @property
    def readers_per_rank(self) -> int:
        return self.spec.readers_per_rank

    def _start(self) -> Iterator:
        readers = _Readers(self.spec, self._next_reader, dict(self._states))
        if self.num_workers == 0:
            return iter(readers)
        # tokenizers' Rust thread pool must not be inherited by forked workers (it would deadlock; the
        # library then disables itself with a warning): each worker tokenizes single-threaded anyway
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._loader = DataLoader(
            readers,
            batch_size=None,  # the streams batch themselves
            # as is: the default converter walks the reader state's token buffer element by element (3-5x slower)
            collate_fn=_as_is,
            worker_init_fn=_init_worker,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=4,
            pin_memory=torch.cuda.is_available(),
            # the workers' base seed from a generator of the loader's own: a new iterator (every fit(), every
            # resume) must not draw from the global torch RNG that dropout uses (resume would not be bit-exact)
            generator=torch.Generator().manual_seed(self.spec.seed),
        )
        it = iter(self._loader)
        # Workers ignore SIGTERM (see _init_worker), so multiprocessing's exit hook, which terminates and joins
        # them, would wait forever: shut them down first (finalize's exit hook runs before it), or on close().
        self._shutdown = weakref.finalize(self, _shutdown_workers, it, os.getpid())
        return it

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = self._start()
        try:
            item = next(self._it)
        except MTPError:  # num_workers=0: raised in this process
            self.close()
            raise
        if isinstance(item, _Failure):  # a worker's bad data: the same one-line error as without workers
            self.close()
            raise item.rebuild()
        batch, local, state = item
        self._states[local] = state
        self._next_reader = (local + 1) % self.readers_per_rank
        return batch

    def close(self) -> None:
        """Stop the workers (also done when the loader is garbage-collected and at interpreter exit)."""
        if self._shutdown is not None:
            self._shutdown()
        self._it, self._loader, self._shutdown = None, None, None

    @property
    def errors(self) -> dict[str, int]:
        """Shards/samples skipped so far by this rank's readers (as far as the handed-out batches go)."""
        return {k: sum(s["errors"].get(k, 0) for s in self._states.values()) for k in ERROR_KINDS}

    def state_dict(self) -> dict[str, Any]:
        return {
            "readers": {str(k): v for k, v in sorted(self._states.items())},
            "next_reader": self._next_reader,
            "num_workers": self.num_workers,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the last batch handed out when ``state`` was taken (same DP size and workers)."""
        for key in ("dp_size", "dp_rank"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data loader: checkpoint has {key}={state[key]}, this run has "
                    f"{getattr(self, key)}"
                )
        if max(int(state["num_workers"]), 1) != self.readers_per_rank:
            raise ValueError(
                f"cannot resume the data loader: checkpoint was written with data.num_workers="
                f"{state['num_workers']}, this run has {self.num_workers}; set data.num_workers="
                f"{state['num_workers']} (each worker is a reader with its own position)"
            )
        self.close()
        self._states = {int(k): v for k, v in state["readers"].items()}
        self._next_reader = int(state["next_reader"])

    def load_resharded(self, loaders: dict[int, dict[str, Any]]) -> None:
        """Continue from the loader states of *all* DP ranks of a run with another DP size or worker count
        (``loaders[dp_rank]``), by :func:`~mtp_pretrain.data.reshard.reshard_states`' rule: no document is
        repeated or skipped, the order changes."""
        any_state = next(iter(loaders.values()))
        old_dp, old_w = int(any_state["dp_size"]), max(int(any_state["num_workers"]), 1)
        if sorted(loaders) != list(range(old_dp)):
            raise ValueError(
                f"cannot re-shard the data position: states of DP ranks {sorted(loaders)}, need 0..{old_dp - 1}"
            )
        old = [loaders[d]["readers"].get(str(w)) for d in range(old_dp) for w in range(old_w)]
        w = self.readers_per_rank
        spec = self.spec
        new = reshard_states(old, self.dp_size * w, spec.datasets, spec.seed)
        self.close()
        self._states = {local: new[self.dp_rank * w + local] for local in range(w)}
        self._next_reader = 0
