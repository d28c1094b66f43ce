"""Helper processes (DataLoader workers, the checkpoint writer's Manager) die with the trainer.

(Crash injection for the fault-tolerance tests lives with the tests: tests/faults.py.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def die_with_parent() -> None:
    """Call first thing in a helper process (DataLoader worker, server process): the kernel kills it when
    the process that started it dies, even by SIGKILL. Otherwise an orphaned helper lives on, holding
    memory and the job's stdout/stderr (a launcher waiting for them hangs). Linux only; a no-op elsewhere."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)
