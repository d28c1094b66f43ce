"""The trainer's metrics facade: reduces each ``log_every`` window and fans the records out to the sinks.

The trainer hands plain ``dict[str, float]`` metric dicts to :class:`MetricsLogger` (key convention in
:mod:`mtp_pretrain.metrics.sink`); this package knows nothing about the model or megatron.

Intended use: call :meth:`MetricsLogger.log_train` after every optimizer step with ``step`` = number of
completed steps (``start_step + 1`` ... ``total_steps``). The progress bar advances on every call; every
``log_every`` steps (plus the first step after ``start_step`` and the last step) the values accumulated
since the previous emit are reduced (mean; ``lr`` and ``data/*`` -> last value, ``mem_gb`` -> max) and
sent to every sink (console, ``run_dir/metrics.jsonl``, wandb) and the in-memory history. A trainer
that already calls only every ``log_every`` steps gets its values through unchanged.
:meth:`MetricsLogger.log_val` always emits. Nothing here ever raises into the training loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mtp_pretrain.config import LoggingConfig
from mtp_pretrain.metrics.console import ConsoleSink
from mtp_pretrain.metrics.jsonl import JSONL_FILE, JsonlSink
from mtp_pretrain.metrics.plot import PLOT_FILE, PlotSink
from mtp_pretrain.metrics.sink import MetricSink, ProgressSink, head_ids, make_record, warn
from mtp_pretrain.metrics.wandb import WandbSink


def open_sinks(
    cfg: LoggingConfig,
    run_dir: Path,
    total_steps: int,
    start_step: int,
    config_dict: dict | None,
    eta: Callable[[int], float | None],
) -> list[MetricSink]:
    """The sinks ``cfg`` asks for, in the order they receive each record (a new sink is added here)."""
    sinks: list[MetricSink] = [JsonlSink(run_dir / JSONL_FILE)]
    if cfg.wandb_mode != "disabled":
        wandb = WandbSink.open(cfg, run_dir, config_dict)
        if wandb is not None:
            sinks.append(wandb)
    sinks.append(ConsoleSink(total_steps, start_step, cfg.run_name, eta))
    if cfg.plot:  # last: it reads metrics.jsonl at close
        sinks.append(PlotSink(run_dir / JSONL_FILE, run_dir / PLOT_FILE, cfg.run_name))
    return sinks


def _to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Coerce values (python numbers, 0-d tensors, numpy scalars) to float; drop what is not numeric."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _reduce_window(window: list[dict[str, float]]) -> dict[str, float]:
    """Mean over the window per key; ``lr`` and ``data/*`` counters -> last value, ``mem_gb`` -> max."""
    if len(window) == 1:
        return dict(window[0])
    values: dict[str, list[float]] = {}
    for metrics in window:
        for key, value in metrics.items():
            values.setdefault(key, []).append(value)
    out = {}
    for key, vals in values.items():
        if key == "lr" or key.startswith("data/"):  # data/*: running totals
            out[key] = vals[-1]
        elif key == "mem_gb":
            out[key] = max(vals)
        else:
            out[key] = sum(vals) / len(vals)
    return out


class MetricsLogger:
    """Sends trainer metric dicts to the sinks :func:`open_sinks` picks from the config.

    ``enabled=False`` (non-logging ranks) turns every method into a no-op: no wandb, no files, no output.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Path,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        config_dict: dict | None = None,
        n_heads: int = 1,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.enabled = enabled
        self.n_heads = int(n_heads)
        self.log_every = max(1, int(cfg.log_every))
        self.history: list[dict[str, Any]] = []  # this session's emitted records (train + val)
        self.jsonl_path = self.run_dir / JSONL_FILE
        self.sinks: list[MetricSink] = []
        self._window: list[dict[str, float]] = []
        self._paths: dict[str, str] | None = None  # what finish() returned, once it ran
        self._eta_ref: tuple[float, int] | None = None  # (time, step) of the first log_train call
        self._warned_heads = False
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sinks = open_sinks(
            cfg, self.run_dir, self.total_steps, self.start_step, config_dict, self._eta_s
        )

    def _emit(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        self.history.append(make_record(split, step, metrics))
        for sink in self.sinks:
            sink.log(split, step, metrics)

    def _eta_s(self, step: int) -> float | None:
        # Rate measured from the first log_train call, so wandb init / the first (compiling) step don't skew it.
        if self._eta_ref is None:
            return None
        t_ref, step_ref = self._eta_ref
        done = step - step_ref
        if done <= 0:
            return None
        rate = done / max(time.perf_counter() - t_ref, 1e-9)
        return max(self.total_steps - step, 0) / rate

    def _check_heads(self, values: Mapping[str, float]) -> None:
        found = head_ids(values)
        if found and len(found) != self.n_heads and not self._warned_heads:
            self._warned_heads = True
            warn(f"expected {self.n_heads} heads, metrics have loss/head{found} keys")

    # ---- public API -------------------------------------------------------------------------------

    def emits(self, step: int) -> bool:
        """Whether ``log_train(step, ...)`` writes a point (the same answer on every rank)."""
        return step % self.log_every == 0 or step >= self.total_steps or step == self.start_step + 1

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        """Record one optimizer step's metrics; emits every ``log_every`` steps (see module docstring)."""
        if not self.enabled or self._paths is not None:
            return
        step = int(step)
        if self._eta_ref is None:
            self._eta_ref = (time.perf_counter(), step)
        values = _to_floats(metrics)
        self._check_heads(values)
        self._window.append(values)
        for sink in self.sinks:
            if isinstance(sink, ProgressSink):
                sink.progress(step, values)
        if not self.emits(step):
            return
        reduced = _reduce_window(self._window)
        self._window = []
        self._emit("train", step, reduced)

    def log_val(self, step: int, metrics: dict[str, float]) -> None:
        """Record validation metrics at ``step`` (always emitted)."""
        if not self.enabled or self._paths is not None:
            return
        self._emit("val", int(step), _to_floats(metrics))

    def finish(self) -> dict[str, str]:
        """Close the sinks (wandb, the bar) and draw ``loss_curves.png`` from the whole ``metrics.jsonl``.

        Returns ``{"run_dir", "wandb", "plot"}`` (``""`` for what was not produced). Idempotent.
        """
        if self._paths is None:
            self._paths = {"run_dir": str(self.run_dir), "wandb": "", "plot": ""}
            for sink in self.sinks:
                self._paths.update(sink.close())
        return dict(self._paths)
