"""Metrics sink for the trainer: wandb + console + ``metrics.jsonl`` + a final loss-curve PNG.

The trainer hands plain ``dict[str, float]`` metric dicts to :class:`MetricsLogger`; this module knows
nothing about the model or megatron. Key convention (train and val dicts alike)::

    loss                      total loss
    loss/head1 .. loss/headN  per-head loss (head k predicts token t+k)
    acc/head1 .. acc/headN    per-head top-1 accuracy
    lr, grad_norm, tokens_per_s, mem_gb
    mfu                       model FLOPs utilisation as a fraction (0.012 -> printed "1.2%")

Intended use: call :meth:`MetricsLogger.log_train` after every optimizer step with ``step`` = number of
completed steps (``start_step + 1`` ... ``total_steps``). The progress bar advances on every call; every
``log_every`` steps (plus the first step after ``start_step`` and the last step) the values accumulated
since the previous emit are reduced (mean; ``lr`` -> last value, ``mem_gb`` -> max) and written to
wandb, the console, the in-memory history and ``run_dir/metrics.jsonl``. A trainer that already calls
only every ``log_every`` steps gets its values through unchanged. :meth:`MetricsLogger.log_val` always
emits. Nothing here ever raises into the training loop: wandb or plotting failures become one warning.

The heavy imports (wandb, matplotlib) are lazy so that non-logging ranks (``enabled=False``) pay nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import string
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mtp_pretrain.config import LoggingConfig

RUN_ID_FILE = "wandb_run_id.txt"
JSONL_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curves.png"
_WANDB_MODES = ("offline", "online", "disabled")
_HEAD_KEY = re.compile(r"^loss/head(\d+)$")


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


def head_ids(metrics: Mapping[str, Any]) -> list[int]:
    """Sorted head numbers k present as ``loss/head{k}`` keys."""
    ids = []
    for key in metrics:
        m = _HEAD_KEY.match(key)
        if m:
            ids.append(int(m.group(1)))
    return sorted(ids)


def _heads_str(metrics: Mapping[str, float], with_acc: bool = False) -> str:
    parts = []
    for k in head_ids(metrics):
        part = f"h{k} {metrics[f'loss/head{k}']:.2f}"
        if with_acc and f"acc/head{k}" in metrics:
            part += f" acc{k} {metrics[f'acc/head{k}']:.3f}"
        parts.append(part)
    return " ".join(parts)


def format_train_line(step: int, total_steps: int, metrics: Mapping[str, float], eta_s: float | None) -> str:
    """``step 120/400 | loss 9.12 | h1 2.01 h2 2.30 | lr 3.0e-04 | gnorm 0.81 | 12.3k tok/s | mfu 1.2% | eta 1m23s``.

    Fields whose key is absent are omitted.
    """
    parts = [f"step {step}/{total_steps}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.2f}")
    heads = _heads_str(metrics)
    if heads:
        parts.append(heads)
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


def format_val_line(step: int, metrics: Mapping[str, float]) -> str:
    """``val step 100 | loss 2.40 | h1 2.01 acc1 0.452 h2 2.30 acc2 0.301``."""
    parts = [f"val step {step}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.2f}")
    heads = _heads_str(metrics, with_acc=True)
    if heads:
        parts.append(heads)
    return " | ".join(parts)


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


# --------------------------------------------------------------------------------------------------
# history + plot helpers (pure functions, usable on any metrics.jsonl)


def load_history(path: Path) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` and resolve resumes.

    A run resumed from an earlier checkpoint re-logs steps it had already logged before the crash; when a
    record's step is <= the last step seen for its split, the earlier records of that split from that step
    on are dropped (the newest run wins). Unparseable lines (e.g. a torn last line) are skipped.
    """
    path = Path(path)
    if not path.is_file():
        return []
    by_split: dict[str, list[dict[str, Any]]] = {}
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or "step" not in rec or "split" not in rec:
                continue
            recs = by_split.setdefault(str(rec["split"]), [])
            step = rec["step"]
            while recs and recs[-1]["step"] >= step:
                recs.pop()
            recs.append(rec)
    return [rec for recs in by_split.values() for rec in recs]


def build_head_series(
    records: Iterable[Mapping[str, Any]],
) -> dict[str, dict[int, tuple[list[int], list[float]]]]:
    """``{split: {head: (steps, losses)}}`` from history records, sorted by step.

    Uses ``loss/head{k}``; a record with no per-head key but a ``loss`` counts as head 1 (single-head runs).
    """
    series: dict[str, dict[int, tuple[list[int], list[float]]]] = {}
    for rec in records:
        split = str(rec.get("split", "train"))
        step = int(rec["step"])
        heads = {k: rec[f"loss/head{k}"] for k in head_ids(rec)}
        if not heads and "loss" in rec:
            heads = {1: rec["loss"]}
        for k, value in heads.items():
            if value is None or not math.isfinite(float(value)):
                continue
            steps, vals = series.setdefault(split, {}).setdefault(k, ([], []))
            steps.append(step)
            vals.append(float(value))
    for per_head in series.values():
        for k, (steps, vals) in list(per_head.items()):
            order = sorted(range(len(steps)), key=steps.__getitem__)
            per_head[k] = ([steps[i] for i in order], [vals[i] for i in order])
    return series


def plot_loss_curves(
    records: Iterable[Mapping[str, Any]], out_path: Path, title: str | None = None, logy: bool = False
) -> Path | None:
    """Per-head train loss (solid) and val loss (dashed, markers), one colour per head. Returns the PNG path
    or ``None`` when there is nothing to plot. Uses the Agg canvas directly (no pyplot, no display)."""
    series = build_head_series(records)
    if not any(series.values()):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i}" for i in range(10)]
    heads = sorted({k for per_head in series.values() for k in per_head})
    for i, k in enumerate(heads):
        color = colors[i % len(colors)]
        if k in series.get("train", {}):
            steps, vals = series["train"][k]
            ax.plot(steps, vals, "-", color=color, linewidth=1.2, label=f"train head{k}")
        if k in series.get("val", {}):
            steps, vals = series["val"][k]
            ax.plot(steps, vals, "--o", color=color, markersize=4, linewidth=1.2, label=f"val head{k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    return out_path


# --------------------------------------------------------------------------------------------------


def new_run_id(length: int = 8) -> str:
    """A wandb-style run id (lowercase letters + digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _warn(msg: str) -> None:
    print(f"WARNING [metrics]: {msg}", file=sys.stderr, flush=True)


class MetricsLogger:
    """Sends trainer metric dicts to wandb, the console and ``run_dir/metrics.jsonl``; plots at the end.

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
        self.wandb_run: Any = None
        self.wandb_dir = ""
        self._window: list[dict[str, float]] = []
        self._bar: tqdm | None = None
        self._finished = False
        self._eta_ref: tuple[float, int] | None = None  # (time, step) of the first log_train call
        self._warned_heads = False
        self.jsonl_path = self.run_dir / JSONL_FILE
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._init_wandb(config_dict)
        if _stdout_is_tty():
            self._bar = tqdm(
                total=self.total_steps,
                initial=min(self.start_step, self.total_steps),
                file=sys.stdout,
                dynamic_ncols=True,
                unit="step",
                desc=cfg.run_name or "train",
            )

    # ---- wandb ------------------------------------------------------------------------------------

    def _init_wandb(self, config_dict: dict | None) -> None:
        mode = self.cfg.wandb_mode
        if mode == "disabled":
            return
        if mode not in _WANDB_MODES:
            _warn(f"unknown wandb_mode={mode!r} (expected one of {_WANDB_MODES}); wandb disabled")
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        id_file = self.run_dir / RUN_ID_FILE
        try:
            import wandb

            run_id = id_file.read_text().strip() if id_file.is_file() else ""
            run_id = run_id or new_run_id()
            run = wandb.init(
                mode=mode,
                project=self.cfg.wandb_project,
                entity=self.cfg.wandb_entity,
                name=self.cfg.run_name,
                dir=str(self.run_dir),
                config=config_dict,
                id=run_id,
                resume="allow",
            )
            if run is None:
                raise RuntimeError("wandb.init returned None")
            # Own x-axis: points are keyed by trainer step, so re-logging steps after a resume from an
            # earlier checkpoint is not dropped by wandb's monotonic internal step.
            run.define_metric("trainer/step")
            run.define_metric("train/*", step_metric="trainer/step")
            run.define_metric("val/*", step_metric="trainer/step")
            id_file.write_text(run_id + "\n")
        except Exception as e:  # never crash training for metrics
            _warn(f"wandb init failed ({type(e).__name__}: {e}); continuing without wandb")
            return
        self.wandb_run = run
        run_files_dir = getattr(run, "dir", "") or ""
        self.wandb_dir = str(Path(run_files_dir).parent) if run_files_dir else ""

    def _wandb_log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        if self.wandb_run is None:
            return
        payload: dict[str, float] = {f"{split}/{k}": v for k, v in metrics.items()}
        payload["trainer/step"] = step
        try:
            self.wandb_run.log(payload)
        except Exception as e:
            _warn(f"wandb log failed ({type(e).__name__}: {e}); disabling wandb")
            self.wandb_run = None

    # ---- records ----------------------------------------------------------------------------------

    def _record(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        rec: dict[str, Any] = {"split": split, "step": step, "time": round(time.time(), 3), **metrics}
        self.history.append(rec)
        try:
            with self.jsonl_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            _warn(f"could not append to {self.jsonl_path} ({e})")
        self._wandb_log(split, step, metrics)

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
            _warn(f"expected {self.n_heads} heads, metrics have loss/head{found} keys")

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    # ---- public API -------------------------------------------------------------------------------

    def emits(self, step: int) -> bool:
        """Whether ``log_train(step, ...)`` writes a point (the same answer on every rank)."""
        return step % self.log_every == 0 or step >= self.total_steps or step == self.start_step + 1

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        """Record one optimizer step's metrics; emits every ``log_every`` steps (see module docstring)."""
        if not self.enabled or self._finished:
            return
        step = int(step)
        if self._eta_ref is None:
            self._eta_ref = (time.perf_counter(), step)
        values = _to_floats(metrics)
        self._check_heads(values)
        self._window.append(values)
        if self._bar is not None:
            self._bar.update(max(0, min(step, self.total_steps) - self._bar.n))
            self._bar.set_postfix_str(_postfix_str(step, values), refresh=False)
        if not self.emits(step):
            return
        reduced = _reduce_window(self._window)
        self._window = []
        self._record("train", step, reduced)
        if self._bar is None:
            self._print(format_train_line(step, self.total_steps, reduced, self._eta_s(step)))

    def log_val(self, step: int, metrics: dict[str, float]) -> None:
        """Record validation metrics at ``step`` (always emitted)."""
        if not self.enabled or self._finished:
            return
        step = int(step)
        values = _to_floats(metrics)
        self._record("val", step, values)
        self._print(format_val_line(step, values))

    def finish(self) -> dict[str, str]:
        """Close wandb and the bar, draw ``loss_curves.png`` from the whole ``metrics.jsonl``.

        Returns ``{"run_dir", "wandb", "plot"}`` (``""`` for what was not produced). Idempotent.
        """
        paths = {"run_dir": str(self.run_dir), "wandb": "", "plot": ""}
        if not self.enabled:
            return paths
        paths["wandb"] = self.wandb_dir
        if self._finished:
            plot = self.run_dir / PLOT_FILE
            paths["plot"] = str(plot) if self.cfg.plot and plot.is_file() else ""
            return paths
        self._finished = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:
                _warn(f"wandb finish failed ({type(e).__name__}: {e})")
            self.wandb_run = None
        if self.cfg.plot:
            try:
                out = plot_loss_curves(
                    load_history(self.jsonl_path), self.run_dir / PLOT_FILE, title=self.cfg.run_name
                )
                paths["plot"] = str(out) if out is not None else ""
            except Exception as e:
                _warn(f"loss-curve plot failed ({type(e).__name__}: {e})")
        return paths
