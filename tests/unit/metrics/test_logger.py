"""MetricsLogger (single process, CPU, wandb disabled): emit rule, window reduction, console + jsonl + plot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import mtp_pretrain.metrics
from mtp_pretrain.config import LoggingConfig
from mtp_pretrain.metrics import MetricsLogger, build_head_series, load_history
from mtp_pretrain.metrics.logger import _reduce_window
from tests.unit.metrics.conftest import PNG_MAGIC, logging_cfg, read_jsonl, train_metrics


def test_disabled_rank_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    lg = MetricsLogger(logging_cfg(wandb_mode="offline"), run_dir, total_steps=10, enabled=False, n_heads=4)
    for s in range(1, 11):
        lg.log_train(s, train_metrics(s))
    lg.log_val(10, train_metrics(10))
    paths = lg.finish()
    assert not run_dir.exists()
    assert paths == {"run_dir": str(run_dir), "wandb": "", "plot": ""}
    assert capsys.readouterr().out == ""
    assert lg.history == []


def test_jsonl_console_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    lg = MetricsLogger(logging_cfg(log_every=4), run_dir, total_steps=10, n_heads=4)
    for s in range(1, 11):
        lg.log_train(s, train_metrics(s))
    lg.log_val(10, train_metrics(10))
    paths = lg.finish()

    # emitted at the first step, every log_every steps and the last step; val always
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in recs] == [
        ("train", 1),
        ("train", 4),
        ("train", 8),
        ("train", 10),
        ("val", 10),
    ]
    assert [(r["split"], r["step"]) for r in lg.history] == [(r["split"], r["step"]) for r in recs]
    # the window since the previous emit is averaged (steps 2..4), lr is the last value; isclose's default
    # rel_tol=1e-9: the test sums the three floats in the same order as the logger, only rounding may differ
    expected = sum(train_metrics(s)["loss/head2"] for s in (2, 3, 4)) / 3
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


def test_resume_appends_and_plot_includes_old_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    lg = MetricsLogger(logging_cfg(log_every=1, plot=False), run_dir, total_steps=6, n_heads=2)
    for s in range(1, 4):
        lg.log_train(s, train_metrics(s, 2))
    assert lg.finish()["plot"] == ""
    lg2 = MetricsLogger(logging_cfg(log_every=1), run_dir, total_steps=6, start_step=3, n_heads=2)
    for s in range(4, 7):
        lg2.log_train(s, train_metrics(s, 2))
    lg2.finish()
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    series = build_head_series(load_history(run_dir / "metrics.jsonl"))
    assert series["train"][2][0] == [1, 2, 3, 4, 5, 6]
    assert "step 4/6" in capsys.readouterr().out


def test_head_count_mismatch_warns_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lg = MetricsLogger(logging_cfg(log_every=1, plot=False), tmp_path / "run", total_steps=3, n_heads=4)
    for s in range(1, 4):
        lg.log_train(s, train_metrics(s, 2))
    lg.finish()
    assert capsys.readouterr().err.count("expected 4 heads") == 1


def test_metrics_package_is_model_agnostic() -> None:
    # the metrics package must not import megatron or know about the model
    for src in Path(mtp_pretrain.metrics.__file__).parent.glob("*.py"):
        text = src.read_text()
        assert "import megatron" not in text and "mtp_pretrain.model" not in text, src.name


def test_window_keeps_last_lr_and_data_counters_max_memory_and_means_the_rest() -> None:
    window = [
        {"loss": 2.0, "lr": 1.0, "mem_gb": 3.0, "data/shards_skipped": 1.0},
        {"loss": 4.0, "lr": 0.5, "mem_gb": 2.0, "data/shards_skipped": 3.0},
    ]
    assert _reduce_window(window) == {"loss": 3.0, "lr": 0.5, "mem_gb": 3.0, "data/shards_skipped": 3.0}


def test_emits_is_the_same_rule_on_every_rank(tmp_path: Path) -> None:
    cfg = LoggingConfig(wandb_mode="disabled", log_every=5, plot=False)
    on = MetricsLogger(cfg, tmp_path / "a", total_steps=12, start_step=2, enabled=True, n_heads=1)
    off = MetricsLogger(cfg, tmp_path / "b", total_steps=12, start_step=2, enabled=False, n_heads=1)
    steps = [s for s in range(3, 13) if on.emits(s)]
    assert steps == [3, 5, 10, 12] and steps == [s for s in range(3, 13) if off.emits(s)]
