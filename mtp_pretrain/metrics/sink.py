"""What every metrics sink receives, and the record format they share.

A sink gets the *emitted* records only: one per ``log_every`` window of train steps (already reduced by
:class:`~mtp_pretrain.metrics.logger.MetricsLogger`) and one per validation. Key convention of a record's
metrics (train and val alike)::

    loss                      total loss
    loss/head1 .. loss/headN  per-head loss (head k predicts token t+k)
    acc/head1 .. acc/headN    per-head top-1 accuracy
    accept_2 .. accept_N      validation only: fraction of positions where heads 1..k all hit their targets
    tokens_per_forward        validation only: self-speculative tokens per drafting forward implied by them
    lr, grad_norm, tokens_per_s, mem_gb
    mfu                       model FLOPs utilisation as a fraction (0.012 -> printed "1.2%")
    data/*                    running totals of the data pipeline's error counters

A sink never raises into the training loop: its failures become one warning (:func:`warn`).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

_HEAD_KEY = re.compile(r"^loss/head(\d+)$")


class MetricSink(Protocol):
    """Where emitted metrics go (console, ``metrics.jsonl``, wandb, the final plot ...)."""

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        """One emitted record: ``split`` is ``"train"`` or ``"val"``, ``step`` the completed optimizer steps."""
        ...

    def close(self) -> dict[str, str]:
        """Flush and release; returns the paths it produced by name (merged into ``MetricsLogger.finish()``)."""
        ...


@runtime_checkable
class ProgressSink(MetricSink, Protocol):
    """A sink that also shows every optimizer step, emitted or not (the console's progress bar)."""

    def progress(self, step: int, metrics: Mapping[str, float]) -> None: ...


def make_record(split: str, step: int, metrics: Mapping[str, float]) -> dict[str, Any]:
    """The one record format: a ``metrics.jsonl`` line and an entry of ``MetricsLogger.history``."""
    return {"split": split, "step": step, "time": round(time.time(), 3), **metrics}


def head_ids(metrics: Mapping[str, Any]) -> list[int]:
    """Sorted head numbers k present as ``loss/head{k}`` keys."""
    ids = []
    for key in metrics:
        m = _HEAD_KEY.match(key)
        if m:
            ids.append(int(m.group(1)))
    return sorted(ids)


def warn(msg: str) -> None:
    print(f"WARNING [metrics]: {msg}", file=sys.stderr, flush=True)
