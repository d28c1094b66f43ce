"""Process faults. :func:`die_with_parent` for helper processes; and crash injection for the fault-tolerance
tests: ``MTP_CRASH_AT=<point>:<k>`` SIGKILLs this process the k-th time it passes ``<point>`` (no clean-up,
no flush: what a preemption or an OOM kill does).

Points: ``micro_batch`` (after a micro-batch is handed to the engine, i.e. mid gradient accumulation),
``step`` (after an optimizer step), ``save_written`` (checkpoint files written, not yet verified or
renamed), ``save_renamed`` (checkpoint renamed into place, ``latest`` not yet updated).
Unset (always, outside tests), :func:`crash_point` is one dictionary lookup.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>

_hits: dict[str, int] = {}


def die_with_parent() -> None:
    """Call first thing in a helper process (DataLoader worker, server process): the kernel kills it when
    the process that started it dies, even by SIGKILL. Otherwise an orphaned helper lives on, holding
    memory and the job's stdout/stderr (a launcher waiting for them hangs). Linux only; a no-op elsewhere."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


def crash_point(name: str) -> None:
    spec = os.environ.get("MTP_CRASH_AT")
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
