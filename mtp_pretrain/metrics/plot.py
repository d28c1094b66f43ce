"""Loss curves drawn from ``metrics.jsonl`` files only, so any run can be re-plotted (``mtp-plot``).

One run: every head on one axes, a colour per head (the heads compared with each other). Several runs: a
panel per head, a colour per run (the runs compared head by head, e.g. n=1 against n=4). Train is solid,
val dashed with markers. :class:`PlotSink` draws the end-of-training ``loss_curves.png`` the same way.
matplotlib is imported only when drawing, through the Agg canvas (no pyplot, no display).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from mtp_pretrain.metrics.jsonl import JSONL_FILE
from mtp_pretrain.metrics.sink import head_ids, warn

PLOT_FILE = "loss_curves.png"
COMPARE_FILE = "loss_curves_compare.png"  # mtp-plot's default for several runs, in the working directory
_SPLITS = ("train", "val")  # drawn in this order; other splits are ignored
_LINE_STYLE: dict[str, dict[str, Any]] = {
    "train": {"linestyle": "-", "linewidth": 1.2},
    "val": {"linestyle": "--", "marker": "o", "markersize": 4, "linewidth": 1.2},
}


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


class Curve(NamedTuple):
    """One line of a plot: a run's loss of one head on one split."""

    run: str  # "" for a single run (the labels then name only split and head)
    split: str
    head: int
    steps: list[int]
    losses: list[float]

    @property
    def label(self) -> str:
        return " ".join(part for part in (self.run, self.split, f"head{self.head}") if part)


def load_runs(run_dirs: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """``{label: history}`` per run dir, labelled by basename (by the path as given where basenames clash).

    Raises FileNotFoundError naming the first dir without a ``metrics.jsonl``.
    """
    for d in run_dirs:
        if not (Path(d) / JSONL_FILE).is_file():
            raise FileNotFoundError(f"{d} has no {JSONL_FILE} (not a run dir, or no step was logged yet)")
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    return {name: load_history(Path(d) / JSONL_FILE) for name, d in zip(names, run_dirs, strict=True)}


def curves_by_head(runs: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[int, list[Curve]]:
    """``{head: [Curve ...]}``: per head, each run's train then val curve (runs in the given order)."""
    by_head: dict[int, list[Curve]] = {}
    for run, records in runs.items():
        series = build_head_series(records)
        for k in sorted({k for split in _SPLITS for k in series.get(split, {})}):
            for split in _SPLITS:
                if k in series.get(split, {}):
                    by_head.setdefault(k, []).append(Curve(run, split, k, *series[split][k]))
    return dict(sorted(by_head.items()))


def plot_runs(
    runs: Mapping[str, Iterable[Mapping[str, Any]]],
    out_path: Path,
    title: str | None = None,
    logy: bool = False,
) -> Path | None:
    """Loss curves of one or several runs (see the module docstring for the layout) as a PNG.

    Returns the PNG path, or ``None`` when there is nothing to plot.
    """
    by_head = curves_by_head(runs)
    if not by_head:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    one_run = len(runs) == 1
    # one run: one panel, a colour per head; several: a panel per head, a colour per run
    panels = {None: [c for curves in by_head.values() for c in curves]} if one_run else dict(by_head)
    color_by = "head" if one_run else "run"
    color_of = {key: f"C{i % 10}" for i, key in enumerate(by_head if one_run else runs)}
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(8, 5) if len(panels) == 1 else (6 * ncols, 3.8 * nrows), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True).ravel()
    for ax, (head, curves) in zip(axes, panels.items(), strict=False):
        for c in curves:
            ax.plot(
                c.steps, c.losses, color=color_of[getattr(c, color_by)], label=c.label, **_LINE_STYLE[c.split]
            )
        if head is not None:
            ax.set_title(f"head {head} (predicts t+{head})", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if len(panels) == 1 else 1)
    for ax in axes[len(panels) :]:  # the empty cell of an odd number of head panels
        ax.set_visible(False)
    if title and len(panels) == 1:
        axes[0].set_title(title)
    elif title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    return out_path


def plot_loss_curves(
    records: Iterable[Mapping[str, Any]], out_path: Path, title: str | None = None, logy: bool = False
) -> Path | None:
    """One run's per-head loss curves (:func:`plot_runs` with a single run); ``None`` when nothing to plot."""
    return plot_runs({"": records}, out_path, title=title, logy=logy)


class PlotSink:
    """Draws ``out_path`` at close from the whole ``metrics.jsonl``: earlier sessions of a resumed run too."""

    def __init__(self, jsonl_path: Path, out_path: Path, title: str | None) -> None:
        self.jsonl_path, self.out_path, self.title = Path(jsonl_path), Path(out_path), title

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        pass  # the file is the source: it holds the records of every session

    def close(self) -> dict[str, str]:
        try:
            out = plot_loss_curves(load_history(self.jsonl_path), self.out_path, title=self.title)
        except Exception as e:  # never crash training for a plot
            warn(f"loss-curve plot failed ({type(e).__name__}: {e})")
            return {"plot": ""}
        return {"plot": str(out) if out is not None else ""}
