"""Tests for mtp_pretrain.metrics (single process, CPU, wandb offline; no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mtp_pretrain import metrics as M
from mtp_pretrain.config import LoggingConfig
from mtp_pretrain.metrics import (
    MetricsLogger,
    build_head_series,
    format_duration,
    format_train_line,
    format_val_line,
    load_history,
    plot_loss_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train_metrics(step: int, n_heads: int = 4) -> dict[str, float]:
    m: dict[str, float] = {
        "lr": 3e-4,
        "grad_norm": 0.81,
        "tokens_per_s": 12345.0,
        "mfu": 0.012,
        "mem_gb": 1.5,
    }
    total = 0.0
    for k in range(1, n_heads + 1):
        loss = 2.0 + 0.1 * k + 1.0 / (step + 1)
        m[f"loss/head{k}"] = loss
        m[f"acc/head{k}"] = 0.5 / k
        total += loss
    m["loss"] = total / n_heads
    return m


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cfg(**kw) -> LoggingConfig:
    base = {"wandb_mode": "disabled", "run_name": "t", "log_every": 2, "plot": True}
    base.update(kw)
    return LoggingConfig(**base)


# ------------------------------------------------------------------ formatting helpers


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0, "0s"), (45.4, "45s"), (83, "1m23s"), (65, "1m05s"), (2 * 3600 + 5 * 60 + 10, "2h05m"),
     (3 * 86400 + 4 * 3600, "3d04h"), (-1, "?"), (float("inf"), "?"), (float("nan"), "?")],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


def test_format_train_line_matches_spec() -> None:
    m = {"loss": 9.123, "loss/head1": 2.01, "loss/head2": 2.30, "loss/head3": 2.41, "loss/head4": 2.40,
         "lr": 3e-4, "grad_norm": 0.81, "tokens_per_s": 12300.0, "mfu": 0.012}
    line = format_train_line(120, 400, m, eta_s=83)
    assert line == ("step 120/400 | loss 9.12 | h1 2.01 h2 2.30 h3 2.41 h4 2.40 | lr 3.0e-04 | gnorm 0.81 "
                    "| 12.3k tok/s | mfu 1.2% | eta 1m23s")


def test_format_val_line() -> None:
    line = format_val_line(100, {"loss": 2.4, "loss/head1": 2.01, "acc/head1": 0.452, "loss/head2": 2.3})
    assert line == "val step 100 | loss 2.40 | h1 2.01 acc1 0.452 h2 2.30"


def test_heads_sorted_numerically() -> None:
    m = {f"loss/head{k}": float(k) for k in (10, 2, 1)}
    assert M.head_ids(m) == [1, 2, 10]


# ------------------------------------------------------------------ history / plot helpers


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


def test_plot_loss_curves_lines_match_heads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes

    drawn: list[tuple[str, str, str]] = []
    orig_plot = Axes.plot

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        lines = orig_plot(self, *args, **kwargs)
        for ln in lines:
            drawn.append((ln.get_label(), ln.get_linestyle(), str(ln.get_color())))
        return lines

    monkeypatch.setattr(Axes, "plot", spy)
    recs = [{"split": "train", "step": s, **_train_metrics(s, 3)} for s in range(1, 6)]
    recs += [{"split": "val", "step": 5, **_train_metrics(5, 3)}]
    out = plot_loss_curves(recs, tmp_path / "c.png", logy=True)
    assert out is not None and out.read_bytes()[:8] == PNG_MAGIC
    labels = {lab: (ls, color) for lab, ls, color in drawn}
    assert set(labels) == {f"{sp} head{k}" for sp in ("train", "val") for k in (1, 2, 3)}
    for k in (1, 2, 3):
        assert labels[f"train head{k}"][0] == "-"
        assert labels[f"val head{k}"][0] == "--"
        assert labels[f"train head{k}"][1] == labels[f"val head{k}"][1]  # same colour per head
    assert plot_loss_curves([], tmp_path / "none.png") is None


# ------------------------------------------------------------------ MetricsLogger


def test_disabled_rank_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    lg = MetricsLogger(_cfg(wandb_mode="offline"), run_dir, total_steps=10, enabled=False, n_heads=4)
    for s in range(1, 11):
        lg.log_train(s, _train_metrics(s))
    lg.log_val(10, _train_metrics(10))
    paths = lg.finish()
    assert not run_dir.exists()
    assert paths == {"run_dir": str(run_dir), "wandb": "", "plot": ""}
    assert capsys.readouterr().out == ""
    assert lg.history == []


def test_jsonl_console_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    lg = MetricsLogger(_cfg(log_every=4), run_dir, total_steps=10, n_heads=4)
    for s in range(1, 11):
        lg.log_train(s, _train_metrics(s))
    lg.log_val(10, _train_metrics(10))
    paths = lg.finish()

    # emitted at the first step, every log_every steps and the last step; val always
    recs = _read_jsonl(run_dir / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in recs] == [("train", 1), ("train", 4), ("train", 8),
                                                        ("train", 10), ("val", 10)]
    assert [(r["split"], r["step"]) for r in lg.history] == [(r["split"], r["step"]) for r in recs]
    # the window since the previous emit is averaged (steps 2..4), lr is the last value
    expected = sum(_train_metrics(s)["loss/head2"] for s in (2, 3, 4)) / 3
    assert math.isclose(recs[1]["loss/head2"], expected)
    assert recs[1]["lr"] == 3e-4
    assert {f"loss/head{k}" for k in range(1, 5)} <= set(recs[0])

    out = capsys.readouterr().out  # pytest's stdout is not a TTY -> plain lines
    lines = out.splitlines()
    train_lines = [ln for ln in lines if ln.startswith("step ")]
    assert len(train_lines) == 4
    assert train_lines[1].startswith("step 4/10 | loss ")
    for k in range(1, 5):
        assert f"h{k} " in train_lines[1]
    for frag in ("lr 3.0e-04", "gnorm 0.81", "12.3k tok/s", "mfu 1.2%", "eta "):
        assert frag in train_lines[1]
    val_lines = [ln for ln in lines if ln.startswith("val step 10")]
    assert len(val_lines) == 1 and "h1 " in val_lines[0] and "acc1 " in val_lines[0]

    assert paths["run_dir"] == str(run_dir)
    assert paths["wandb"] == ""
    png = Path(paths["plot"])
    assert png == run_dir / "loss_curves.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == PNG_MAGIC
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_run_id.txt").exists()
    assert lg.finish()["plot"] == str(png)  # idempotent


def test_resume_appends_and_plot_includes_old_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    lg = MetricsLogger(_cfg(log_every=1, plot=False), run_dir, total_steps=6, n_heads=2)
    for s in range(1, 4):
        lg.log_train(s, _train_metrics(s, 2))
    assert lg.finish()["plot"] == ""
    lg2 = MetricsLogger(_cfg(log_every=1), run_dir, total_steps=6, start_step=3, n_heads=2)
    for s in range(4, 7):
        lg2.log_train(s, _train_metrics(s, 2))
    lg2.finish()
    steps = [r["step"] for r in _read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    series = build_head_series(load_history(run_dir / "metrics.jsonl"))
    assert series["train"][2][0] == [1, 2, 3, 4, 5, 6]
    assert "step 4/6" in capsys.readouterr().out


def test_tty_mode_uses_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "_stdout_is_tty", lambda: True)
    lg = MetricsLogger(_cfg(log_every=5), tmp_path / "run", total_steps=10, start_step=2, n_heads=2)
    assert lg._bar is not None and lg._bar.n == 2
    for s in range(3, 8):
        lg.log_train(s, _train_metrics(s, 2))
    assert lg._bar.n == 7
    assert "h1 " in lg._bar.postfix and "h2 " in lg._bar.postfix and "tok/s" in lg._bar.postfix
    lg.finish()
    assert lg._bar is None


def test_wandb_offline_run_dir_and_id_reuse(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = _cfg(wandb_mode="offline", plot=False)
    lg = MetricsLogger(cfg, run_dir, total_steps=4, config_dict={"model": {"n_heads": 2}}, n_heads=2)
    assert lg.wandb_run is not None
    for s in range(1, 5):
        lg.log_train(s, _train_metrics(s, 2))
    lg.log_val(4, _train_metrics(4, 2))
    paths = lg.finish()
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert run_id
    wdir = Path(paths["wandb"])
    assert wdir.is_dir() and wdir.is_relative_to(run_dir / "wandb") and wdir.name.endswith(run_id)
    assert (wdir / f"run-{run_id}.wandb").is_file()

    lg2 = MetricsLogger(cfg, run_dir, total_steps=8, start_step=4, n_heads=2)
    assert lg2.wandb_run is not None and lg2.wandb_run.id == run_id
    lg2.log_train(5, _train_metrics(5, 2))
    lg2.finish()
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id


def test_wandb_init_failure_warns_and_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import wandb

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("No API key configured")

    monkeypatch.setattr(wandb, "init", boom)
    run_dir = tmp_path / "run"
    lg = MetricsLogger(_cfg(wandb_mode="online"), run_dir, total_steps=2, n_heads=1)
    err = capsys.readouterr().err
    warn_lines = [ln for ln in err.splitlines() if "wandb init failed" in ln]
    assert len(warn_lines) == 1 and "No API key configured" in warn_lines[0]
    assert lg.wandb_run is None
    lg.log_train(1, {"loss": 3.0})
    lg.log_train(2, {"loss": 2.5})
    paths = lg.finish()
    assert paths["wandb"] == ""
    assert not (run_dir / "wandb_run_id.txt").exists()
    assert len(_read_jsonl(run_dir / "metrics.jsonl")) == 2
    assert Path(paths["plot"]).is_file()  # single-head run plotted from `loss`


def test_wandb_silent_env_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("x")

    monkeypatch.setattr(wandb, "init", boom)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    MetricsLogger(_cfg(wandb_mode="offline"), tmp_path / "a", total_steps=1).finish()
    assert M.os.environ["WANDB_SILENT"] == "true"
    monkeypatch.setenv("WANDB_SILENT", "false")
    MetricsLogger(_cfg(wandb_mode="offline"), tmp_path / "b", total_steps=1).finish()
    assert M.os.environ["WANDB_SILENT"] == "false"


def test_metrics_module_is_model_agnostic() -> None:
    # metrics.py must not import megatron or know about the model
    src = Path(M.__file__).read_text()
    assert "import megatron" not in src and "mtp_pretrain.model" not in src


def test_window_keeps_last_lr_and_data_counters_max_memory_and_means_the_rest() -> None:
    window = [
        {"loss": 2.0, "lr": 1.0, "mem_gb": 3.0, "data/shards_skipped": 1.0},
        {"loss": 4.0, "lr": 0.5, "mem_gb": 2.0, "data/shards_skipped": 3.0},
    ]
    assert M._reduce_window(window) == {"loss": 3.0, "lr": 0.5, "mem_gb": 3.0, "data/shards_skipped": 3.0}


def test_emits_is_the_same_rule_on_every_rank(tmp_path: Path) -> None:
    cfg = LoggingConfig(wandb_mode="disabled", log_every=5, plot=False)
    on = MetricsLogger(cfg, tmp_path / "a", total_steps=12, start_step=2, enabled=True, n_heads=1)
    off = MetricsLogger(cfg, tmp_path / "b", total_steps=12, start_step=2, enabled=False, n_heads=1)
    steps = [s for s in range(3, 13) if on.emits(s)]
    assert steps == [3, 5, 10, 12] and steps == [s for s in range(3, 13) if off.emits(s)]
