"""How a benchmark's processes are set up: glibc's mmap threshold, a torchrun re-launch, and the
torch.distributed world around the measurement (children get mtp_pretrain.processes.child_env).

Imports nothing heavy at module level: ``pin_mmap_threshold`` runs before torch loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtp_pretrain.parallel import Layout

# glibc serves every allocation above this many bytes with its own mmap, returned to the OS when freed, so
# the resident set follows live tensor bytes: what the CPU peak-memory method (memory.py) reads
MMAP_THRESHOLD = "65536"


def mmap_threshold_pinned() -> bool:
    return os.environ.get("MALLOC_MMAP_THRESHOLD_") == MMAP_THRESHOLD


def pin_mmap_threshold() -> None:
    """Re-execute this process's command line with MALLOC_MMAP_THRESHOLD_ pinned, unless it already is.

    glibc reads the variable once, when the process starts: setting it later has no effect, hence the
    re-exec (of ``sys.orig_argv``, so `python tools/x.py` and `python -m ...` both come back as they were).
    Call it first thing in a benchmark's entry point, before torch loads (it would load twice)."""
    if mmap_threshold_pinned():
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def relaunch_under_torchrun(module: str, world_size: int, argv: list[str] | None) -> None:
    """Unless torchrun started this process (RANK is set), run ``python -m module argv`` as ``world_size``
    processes under torchrun and exit with its status; under torchrun, return."""
    if "RANK" in os.environ:
        return
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world_size}",
    ]
    sys.exit(subprocess.call([*launcher, "-m", module, *(sys.argv[1:] if argv is None else argv)]))


@contextmanager
def distributed_world(tp: int = 1, pp: int = 1) -> Iterator[Layout]:
    """torch.distributed + megatron's groups for the block (a private world of one outside torchrun)."""
    from mtp_pretrain import parallel

    layout = parallel.init_distributed(tp=tp, pp=pp)
    try:
        yield layout
    finally:
        parallel.destroy_distributed()
