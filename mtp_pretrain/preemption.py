"""Graceful stop: SIGTERM / SIGUSR1 or a stop file make every rank save at the next step boundary and exit.

A signal reaches one process (torchrun does not forward SIGUSR1 to its workers; SLURM may signal only the
batch shell), so the decision is agreed each step in the engine's one flag all-reduce (MAX over the world, together
with the non-finite-loss flag): if any rank was asked to stop, all stop after the same step, save one checkpoint and exit with
``EXIT_PREEMPTED`` for the launcher to requeue. The stop file (``<run_dir>/STOP`` by default) is how a
batch script reaches workers that never see its signal; it is removed once the checkpoint is written.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

from mtp_pretrain.errors import EXIT_PREEMPTED  # noqa: F401 (the exit status of a stop, re-exported)

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

    def requested(self) -> bool:
        """Whether THIS rank was asked to stop (a signal, or the stop file). The engine agrees it across
        ranks in the step's one flag all-reduce (engine/base.py); :meth:`agreed` takes the answer."""
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        return self.reason is not None

    def agreed(self, any_rank: bool) -> bool:
        """Record the world's answer (any rank asked): every rank then stops after the same step."""
        if any_rank and self.reason is None:
            self.reason = "another rank was asked to stop"
        return any_rank

    def acknowledge(self) -> None:
        """The checkpoint is written: remove the stop file so the requeued run does not stop at once."""
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)
