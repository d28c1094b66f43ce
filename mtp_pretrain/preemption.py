"""Graceful stop: SIGTERM / SIGUSR1 or a stop file make every rank save at the next step boundary and exit.

A signal reaches one process (torchrun does not forward SIGUSR1 to its workers; SLURM may signal only the
batch shell), so the decision is agreed each step with one tiny all-reduce (MAX over the world): if any
rank was asked to stop, all stop after the same step, save one checkpoint and exit with
``EXIT_PREEMPTED`` for the launcher to requeue. The stop file (``<run_dir>/STOP`` by default) is how a
batch script reaches workers that never see its signal; it is removed once the checkpoint is written.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from mtp_pretrain import compat

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — the launcher requeues, the run resumes
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records stop signals and answers, the same on every rank, whether to stop after this step."""

    def __init__(self, stop_file: Path | None) -> None:
        self.stop_file = stop_file
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.reason = signal.Signals(signum).name

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}

    def should_stop(self) -> bool:
        """True on every rank if any rank got a signal or sees the stop file (a collective: call on all)."""
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        flag = torch.tensor([0.0 if self.reason is None else 1.0], device=compat.device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.reason is None:
            self.reason = "another rank was asked to stop"
        return flag.item() > 0

    def acknowledge(self) -> None:
        """The checkpoint is written: remove the stop file so the requeued run does not stop at once."""
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)
