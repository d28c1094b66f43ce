"""Graceful stop: SIGTERM / SIGUSR1 or a stop file make every rank save at the next step boundary and exit.

A signal reaches one process (torchrun does not forward SIGUSR1 to its workers; SLURM may signal only the
batch shell), so the decision is agreed each step in the engine's one flag all-reduce (MAX over the world, together
with the non-finite-loss flag): if any rank was asked to stop, all stop after the same step, save one checkpoint and exit with
``EXIT_PREEMPTED`` for the launcher to requeue. The stop file (``<run_dir>/STOP`` by default) is how a
batch script reaches workers that never see its signal; it is removed once the checkpoint is written.

A stop request belongs to the job that received it. The sbatch script (slurm.py) writes a stamp into the
stop file, ``{"slurm_job_id": "<id>", "restart_count": <n>}``, and a stamped file counts only for that job
and attempt (``SLURM_JOB_ID`` / ``SLURM_RESTART_COUNT``): a request that came after the last step (nothing
left to save) or whose job was killed before it could save would otherwise stop the next job in the run dir
at its first step. Such a stale file is removed when training starts, with a line on stderr. A file without
a stamp (``touch STOP``, the user's own scripts) belongs to no job and is always honoured: before the run or
during it, it means "save and stop now".
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from mtp_pretrain.errors import EXIT_PREEMPTED  # noqa: F401 (the exit status of a stop, re-exported)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def this_job() -> dict[str, str] | None:
    """This process's stamp fields: its Slurm job id and restart count as strings (None outside Slurm)."""
    job = os.environ.get("SLURM_JOB_ID")
    return (
        None
        if not job
        else {"slurm_job_id": job, "restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")}
    )


def read_stamp(stop_file: Path) -> dict[str, str] | None:
    """The stamp in ``stop_file`` (fields as strings), or None for an unstamped (empty, hand-made) file."""
    try:
        stamp = json.loads(stop_file.read_text() or "null")
    except (OSError, ValueError):  # gone meanwhile, or text that is no stamp: a hand-made request
        return None
    if not isinstance(stamp, dict) or "slurm_job_id" not in stamp:
        return None
    return {k: str(stamp.get(k, "0")) for k in ("slurm_job_id", "restart_count")}


def describe_stamp(stamp: dict[str, str]) -> str:
    return f"Slurm job {stamp['slurm_job_id']}, restart {stamp['restart_count']}"


class StopRequest:
    """Records stop signals and answers, the same on every rank, whether to stop after this step.

    ``clear_stale``: remove a stop file stamped by another job or attempt now (and say so on stderr); one
    rank does it (global rank 0), the others only ignore such a file."""

    def __init__(self, stop_file: Path | None, clear_stale: bool = False) -> None:
        self.stop_file = stop_file
        self.reason: str | None = None
        self.job = this_job()
        self._previous: dict[int, object] = {}
        if clear_stale and stop_file is not None:
            stamp = self._stale_stamp()
            if stamp is not None:
                try:
                    stop_file.unlink()
                except FileNotFoundError:
                    pass
                else:
                    print(
                        f"removed stale stop file {stop_file}: requested of {describe_stamp(stamp)}, not of this "
                        f"job ({describe_stamp(self.job) if self.job else 'not a Slurm job'})",
                        file=sys.stderr,
                        flush=True,
                    )
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _stale_stamp(self) -> dict[str, str] | None:
        """The stamp of an existing stop file that another job or attempt wrote, else None."""
        if self.stop_file is None or not self.stop_file.exists():
            return None
        stamp = read_stamp(self.stop_file)
        return stamp if stamp is not None and stamp != self.job else None

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
            if self._stale_stamp() is None:  # unstamped, or this job's: a request (stale ones are ignored)
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
