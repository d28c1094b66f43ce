"""Test-only fault injection: ``python tests/faults.py POINT:K [mtp-train overrides ...]`` runs mtp-train and
SIGKILLs it (no clean-up, no flush: what a preemption or the OOM killer does) the K-th time it reaches POINT.

Points, each a method wrapped here (production code carries no hooks):
  micro_batch   a training micro-batch was read (BatchLoader.__next__): mid gradient accumulation
  step          an optimizer step returned (the engine's train_step), before the trainer saves
  save_written  every rank's checkpoint files are written; not yet listed nor renamed (Checkpointer._commit)
  save_renamed  the checkpoint was renamed into place; ``latest`` not yet updated (Checkpointer._mark_latest)
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def _kill_at(owner: type, method: str, count: int, after: bool) -> None:
    """Wrap ``owner.method``: the ``count``-th call kills the process, before or after the original runs."""
    original: Callable = getattr(owner, method)
    calls = 0

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if not after and calls == count:
            os.kill(os.getpid(), signal.SIGKILL)
        out = original(*args, **kwargs)
        if after and calls == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, method, wrapped)


def install(spec: str) -> None:
    from mtp_pretrain.checkpoint import Checkpointer
    from mtp_pretrain.data.loader import BatchLoader
    from mtp_pretrain.engine.megatron import MegatronEngine

    point, _, count = spec.partition(":")
    where = {
        "micro_batch": (BatchLoader, "__next__", True),
        "step": (MegatronEngine, "train_step", True),
        "save_written": (Checkpointer, "_commit", False),
        "save_renamed": (Checkpointer, "_mark_latest", False),
    }
    if point not in where:
        raise SystemExit(f"tests/faults.py: unknown point {point!r}; use one of {', '.join(where)}")
    owner, method, after = where[point]
    _kill_at(owner, method, int(count or 1), after)


if __name__ == "__main__":  # dist_checkpointing's helper process re-imports __main__: keep this guard
    spec = sys.argv.pop(1)
    install(spec)
    from mtp_pretrain.cli import train

    train()
