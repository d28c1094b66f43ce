"""Processes the framework starts: helpers (DataLoader workers, the checkpoint writer's Manager) die with
the trainer, ranks die with their torchrun launcher, and a child run (a benchmark, a test's CLI or torchrun
launch) starts a world of its own.

(Crash injection for the fault-tolerance tests lives with the tests: tests/faults.py.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
# set by mtp_pretrain.torchrun to its own pid: lets a rank tell that its launcher died before the rank asked
# to die with it (the parent-death signal is only armed from then on)
LAUNCHER_PID = "MTP_LAUNCHER_PID"
# torch.distributed / torchrun variables: a child that inherited them would join the parent's world (or
# take itself for a torchrun rank)
DIST_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    LAUNCHER_PID,
)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without :data:`DIST_VARS` (the child a world of its own), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(extra)
    return env


def _die_on_parent_death() -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it exits (Linux)."""
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def die_with_parent() -> None:
    """Call first thing in a helper process (DataLoader worker, server process): the kernel kills it when
    the process that started it dies, even by SIGKILL. Otherwise an orphaned helper lives on, holding
    memory and the job's stdout/stderr (a launcher waiting for them hangs). Linux only; a no-op elsewhere."""
    if sys.platform != "linux":
        return
    _die_on_parent_death()
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


def is_running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def exit_with_launcher() -> bool:
    """Call first thing in a rank: when torchrun started this process, the kernel SIGKILLs it the moment
    its launcher dies, even by SIGKILL (its DataLoader workers follow, :func:`die_with_parent`).

    torchrun starts every rank in a session of its own, so killing the launcher's process group (Ctrl-C in
    a shell that lost it, ``kill -9 -PGID``, a batch system killing the launcher) misses the ranks; they
    would train on and write checkpoints into the run dir, racing a restarted job there. The parent-death
    signal fires when the *thread* that forked the rank exits: torchrun's agent starts (and restarts) its
    workers from its main thread, which lives as long as the launcher. Returns whether the signal was
    armed (not under torchrun, or not on Linux: nothing to do)."""
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ or "LOCAL_RANK" not in os.environ:
        return False
    _die_on_parent_death()
    launcher = os.environ.get(LAUNCHER_PID, "")
    # the launcher may have died before prctl: this rank was handed to a reaper and no signal will come.
    # (A launcher pid that is not our parent but still runs was inherited from further up: not ours.)
    if launcher.isdigit() and os.getppid() != int(launcher) and not is_running(int(launcher)):
        print(
            f"rank {os.environ['LOCAL_RANK']}: its launcher (pid {launcher}) is gone: exiting",
            file=sys.stderr,
        )
        os.kill(os.getpid(), signal.SIGKILL)
    return True
