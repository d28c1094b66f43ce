"""Loss curves from metrics.jsonl: history resolution, per-head series, the plots and ``mtp-plot``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtp_pretrain import cli
from mtp_pretrain.metrics.plot import (
    build_head_series,
    curves_by_head,
    load_history,
    load_runs,
    plot_loss_curves,
    plot_runs,
)
from tests.unit.metrics.conftest import PNG_MAGIC, train_metrics


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """(label, linestyle, colour) of every line drawn on any matplotlib axes during the test."""
    from matplotlib.axes import Axes

    lines_seen: list[tuple[str, str, str]] = []
    orig_plot = Axes.plot

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        lines = orig_plot(self, *args, **kwargs)
        for ln in lines:
            lines_seen.append((ln.get_label(), ln.get_linestyle(), str(ln.get_color())))
        return lines

    monkeypatch.setattr(Axes, "plot", spy)
    return lines_seen


def _write_run(run_dir: Path, n_heads: int, steps: int = 6) -> Path:
    """A run dir whose metrics.jsonl has a train record per step and a val record at the last step."""
    run_dir.mkdir(parents=True)
    recs = [
        {"split": "train", "step": s, "time": 0.0, **train_metrics(s, n_heads)} for s in range(1, steps + 1)
    ]
    recs.append({"split": "val", "step": steps, "time": 0.0, **train_metrics(steps, n_heads)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run_dir


def test_load_history_resolves_resume_rewind(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    recs = [{"split": "train", "step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
    recs.append({"split": "val", "step": 4, "loss": 0.5})
    # resumed from a checkpoint at step 2: steps 3.. are logged again by the new run
    recs += [{"split": "train", "step": s, "loss": 100.0 + s} for s in (3, 4, 5)]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"split": "train", "st')  # torn tail
    hist = load_history(p)
    train = [(r["step"], r["loss"]) for r in hist if r["split"] == "train"]
    assert train == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0), (5, 105.0)]
    assert [r["step"] for r in hist if r["split"] == "val"] == [4]
    assert load_history(tmp_path / "missing.jsonl") == []


def test_build_head_series_and_single_head_fallback() -> None:
    recs = [
        {"split": "train", "step": 2, "loss/head1": 1.0, "loss/head2": 2.0},
        {"split": "train", "step": 1, "loss/head1": 1.5, "loss/head2": float("nan")},
        {"split": "val", "step": 2, "loss/head1": 1.1, "loss/head2": 2.1},
    ]
    s = build_head_series(recs)
    assert s["train"][1] == ([1, 2], [1.5, 1.0])
    assert s["train"][2] == ([2], [2.0])  # NaN dropped
    assert s["val"][2] == ([2], [2.1])
    single = build_head_series([{"split": "train", "step": 1, "loss": 3.0}])
    assert single == {"train": {1: ([1], [3.0])}}


def test_plot_loss_curves_lines_match_heads(tmp_path: Path, drawn: list[tuple[str, str, str]]) -> None:
    recs = [{"split": "train", "step": s, **train_metrics(s, 3)} for s in range(1, 6)]
    recs += [{"split": "val", "step": 5, **train_metrics(5, 3)}]
    out = plot_loss_curves(recs, tmp_path / "c.png", logy=True)
    assert out is not None and out.read_bytes()[:8] == PNG_MAGIC
    labels = {lab: (ls, color) for lab, ls, color in drawn}
    assert set(labels) == {f"{sp} head{k}" for sp in ("train", "val") for k in (1, 2, 3)}
    for k in (1, 2, 3):
        assert labels[f"train head{k}"][0] == "-"
        assert labels[f"val head{k}"][0] == "--"
        assert labels[f"train head{k}"][1] == labels[f"val head{k}"][1]  # same colour per head
    assert plot_loss_curves([], tmp_path / "none.png") is None


def test_two_runs_grouped_per_head_one_colour_per_run(
    tmp_path: Path, drawn: list[tuple[str, str, str]]
) -> None:
    runs = load_runs([_write_run(tmp_path / "n1", 1), _write_run(tmp_path / "n4", 4)])
    assert list(runs) == ["n1", "n4"]
    by_head = curves_by_head(runs)
    # head 1 is in both runs (train + val each); heads 2..4 only in the n=4 run
    assert {k: [(c.run, c.split) for c in curves] for k, curves in by_head.items()} == {
        1: [("n1", "train"), ("n1", "val"), ("n4", "train"), ("n4", "val")],
        2: [("n4", "train"), ("n4", "val")],
        3: [("n4", "train"), ("n4", "val")],
        4: [("n4", "train"), ("n4", "val")],
    }
    assert by_head[1][0].steps == list(range(1, 7)) and by_head[3][1].steps == [6]

    out = plot_runs(runs, tmp_path / "cmp.png", title="n=1 vs n=4")
    assert out is not None and out.read_bytes()[:8] == PNG_MAGIC
    labels = {lab: (ls, color) for lab, ls, color in drawn}
    assert set(labels) == {c.label for curves in by_head.values() for c in curves}
    assert len(labels) == 2 + 2 * 4  # n1: head 1 train + val; n4: 4 heads x train + val
    for lab, (style, _) in labels.items():
        assert style == ("-" if " train " in lab else "--")  # train solid, val dashed
    colours = {
        run: {color for lab, (_, color) in labels.items() if lab.startswith(f"{run} ")} for run in runs
    }
    assert all(len(c) == 1 for c in colours.values()) and colours["n1"] != colours["n4"]  # one colour per run


def test_runs_with_the_same_basename_are_labelled_by_path(tmp_path: Path) -> None:
    a, b = _write_run(tmp_path / "a" / "run", 1), _write_run(tmp_path / "b" / "run", 1)
    assert list(load_runs([a, b])) == [str(a), str(b)]


def test_mtp_plot_two_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    n1, n4 = _write_run(tmp_path / "n1", 1), _write_run(tmp_path / "n4", 4)
    monkeypatch.chdir(tmp_path)
    cli.plot([str(n1), str(n4), "--logy", "--title", "n=1 vs n=4"])
    png = tmp_path / "loss_curves_compare.png"  # several runs: default file in the working directory
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert str(png.name) in capsys.readouterr().out
    cli.plot([str(n4)])  # one run: default file in the run dir
    assert (n4 / "loss_curves.png").read_bytes()[:8] == PNG_MAGIC
    cli.plot([str(n1), "--out", str(tmp_path / "sub" / "x.png")])
    assert (tmp_path / "sub" / "x.png").read_bytes()[:8] == PNG_MAGIC


def test_mtp_plot_without_metrics_jsonl_is_one_line_exit_2(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    good, empty = _write_run(tmp_path / "good", 2), tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        cli.plot([str(good), str(empty)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mtp-plot: error: {empty} has no metrics.jsonl (") and "\n" not in err
