"""Processes the framework starts: helpers (DataLoader workers, the checkpoint writer's Manager) die with
the trainer, and a child run (a benchmark, a test's CLI or torchrun launch) starts a world of its own.

(Crash injection for the fault-tolerance tests lives with the tests: tests/faults.py.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
# torch.distributed / torchrun variables: a child that inherited them would join the parent's world
DIST_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without :data:`DIST_VARS` (the child a world of its own), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(extra)
    return env


def die_with_parent() -> None:
    """Call first thing in a helper process (DataLoader worker, server process): the kernel kills it when
    the process that started it dies, even by SIGKILL. Otherwise an orphaned helper lives on, holding
    memory and the job's stdout/stderr (a launcher waiting for them hangs). Linux only; a no-op elsewhere."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)
