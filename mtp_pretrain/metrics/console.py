"""Console sink: one line per emitted record, or a tqdm progress bar when stdout is a terminal.

On a terminal the bar advances on every optimizer step and shows the latest per-head losses; train records
are not printed (the bar shows them), validation lines are written above the bar. Elsewhere (a Slurm log,
a pipe) every emitted train record becomes one line with the ETA, so logs stay greppable.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Mapping

from tqdm import tqdm

from mtp_pretrain.metrics.sink import head_ids

_ACCEPT_KEY = re.compile(r"^accept_\d+$")

# --------------------------------------------------------------------------------------------------
# formatting helpers


def format_duration(seconds: float) -> str:
    """Compact duration: ``45s``, ``1m23s``, ``2h05m``, ``3d04h``; ``?`` for unknown/negative."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def format_count(x: float) -> str:
    """``850``, ``12.3k``, ``4.56M``, ``1.2G``."""
    if not math.isfinite(x):
        return str(x)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.0f}"


def _heads_str(metrics: Mapping[str, float], with_acc: bool = False) -> str:
    parts = []
    for k in head_ids(metrics):
        part = f"h{k} {metrics[f'loss/head{k}']:.2f}"
        if with_acc and f"acc/head{k}" in metrics:
            part += f" acc{k} {metrics[f'acc/head{k}']:.3f}"
        parts.append(part)
    return " ".join(parts)


def _loss_fields(metrics: Mapping[str, float], with_acc: bool = False) -> list[str]:
    """``["loss 9.12", "h1 2.01 h2 2.30"]``, each present only when its keys are."""
    fields = [f"loss {metrics['loss']:.2f}"] if "loss" in metrics else []
    heads = _heads_str(metrics, with_acc)
    return [*fields, heads] if heads else fields


def format_train_line(step: int, total_steps: int, metrics: Mapping[str, float], eta_s: float | None) -> str:
    """``step 120/400 | loss 9.12 | h1 2.01 h2 2.30 | lr 3.0e-04 | gnorm 0.81 | 12.3k tok/s | mfu 1.2% | eta 1m23s``.

    Fields whose key is absent are omitted.
    """
    parts = [f"step {step}/{total_steps}", *_loss_fields(metrics)]
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.1e}")
    if "grad_norm" in metrics:
        parts.append(f"gnorm {metrics['grad_norm']:.2f}")
    if "tokens_per_s" in metrics:
        parts.append(f"{format_count(metrics['tokens_per_s'])} tok/s")
    if "mfu" in metrics:
        parts.append(f"mfu {100.0 * metrics['mfu']:.1f}%")
    if "mem_gb" in metrics:
        parts.append(f"mem {metrics['mem_gb']:.1f}G")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def _acceptance_fields(metrics: Mapping[str, float]) -> list[str]:
    """``["accept 2:0.62 3:0.51", "2.13 tok/fwd"]`` from ``accept_k`` and ``tokens_per_forward``, when present."""
    ks = sorted(int(key[len("accept_") :]) for key in metrics if _ACCEPT_KEY.match(key))
    fields = [" ".join(["accept", *(f"{k}:{metrics[f'accept_{k}']:.2f}" for k in ks)])] if ks else []
    if "tokens_per_forward" in metrics:
        fields.append(f"{metrics['tokens_per_forward']:.2f} tok/fwd")
    return fields


def format_val_line(step: int, metrics: Mapping[str, float]) -> str:
    """``val step 100 | loss 2.40 | h1 2.01 acc1 0.452 h2 2.30 acc2 0.301 | accept 2:0.25 | 1.55 tok/fwd``.

    ``accept k:x``: heads 1..k all right at a fraction x of positions; ``tok/fwd``: the tokens per forward of
    self-speculative decoding that implies (HeadStats.acceptance in mtp_pretrain/targets.py).
    """
    return " | ".join(
        [f"val step {step}", *_loss_fields(metrics, with_acc=True), *_acceptance_fields(metrics)]
    )


def _postfix_str(step: int, metrics: Mapping[str, float]) -> str:
    parts = [f"step {step}"]
    heads = _heads_str(metrics)
    if heads:
        parts.append(heads)
    elif "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.2f}")
    if "tokens_per_s" in metrics:
        parts.append(f"{format_count(metrics['tokens_per_s'])} tok/s")
    return " | ".join(parts)


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------


class ConsoleSink:
    """Lines on stdout, or a progress bar on a terminal. ``eta(step)`` gives the seconds left (or None)."""

    def __init__(
        self, total_steps: int, start_step: int, desc: str | None, eta: Callable[[int], float | None]
    ) -> None:
        self.total_steps = total_steps
        self.eta = eta
        self.bar: tqdm | None = None
        if _stdout_is_tty():
            self.bar = tqdm(
                total=total_steps,
                initial=min(start_step, total_steps),
                file=sys.stdout,
                dynamic_ncols=True,
                unit="step",
                desc=desc or "train",
            )

    def progress(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(max(0, min(step, self.total_steps) - self.bar.n))
            self.bar.set_postfix_str(_postfix_str(step, metrics), refresh=False)

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        if split == "val":
            self._print(format_val_line(step, metrics))
        elif self.bar is None:  # on a terminal the bar already shows the train values
            self._print(format_train_line(step, self.total_steps, metrics, self.eta(step)))

    def close(self) -> dict[str, str]:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return {}

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
