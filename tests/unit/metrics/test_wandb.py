"""wandb sink, offline (no network): run dir and id reuse across resumes, failures become one warning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mtp_pretrain.metrics.logger import MetricsLogger
from mtp_pretrain.metrics.wandb import WandbSink
from tests.unit.metrics.conftest import logging_cfg, read_jsonl, train_metrics


def _wandb_run(lg: MetricsLogger) -> Any:
    """The logger's live wandb run, or None (no wandb sink, or it gave up)."""
    return next((s.run for s in lg.sinks if isinstance(s, WandbSink)), None)


def test_wandb_offline_run_dir_and_id_reuse(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = logging_cfg(wandb_mode="offline", plot=False)
    lg = MetricsLogger(cfg, run_dir, total_steps=4, config_dict={"model": {"n_heads": 2}}, n_heads=2)
    assert _wandb_run(lg) is not None
    for s in range(1, 5):
        lg.log_train(s, train_metrics(s, 2))
    lg.log_val(4, train_metrics(4, 2))
    paths = lg.finish()
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert run_id
    wdir = Path(paths["wandb"])
    assert wdir.is_dir() and wdir.is_relative_to(run_dir / "wandb") and wdir.name.endswith(run_id)
    assert (wdir / f"run-{run_id}.wandb").is_file()

    lg2 = MetricsLogger(cfg, run_dir, total_steps=8, start_step=4, n_heads=2)
    assert _wandb_run(lg2) is not None and _wandb_run(lg2).id == run_id
    lg2.log_train(5, train_metrics(5, 2))
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
    lg = MetricsLogger(logging_cfg(wandb_mode="online"), run_dir, total_steps=2, n_heads=1)
    err = capsys.readouterr().err
    warn_lines = [ln for ln in err.splitlines() if "wandb init failed" in ln]
    assert len(warn_lines) == 1 and "No API key configured" in warn_lines[0]
    assert _wandb_run(lg) is None
    lg.log_train(1, {"loss": 3.0})
    lg.log_train(2, {"loss": 2.5})
    paths = lg.finish()
    assert paths["wandb"] == ""
    assert not (run_dir / "wandb_run_id.txt").exists()
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 2
    assert Path(paths["plot"]).is_file()  # single-head run plotted from `loss`


def test_wandb_silent_env_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("x")

    monkeypatch.setattr(wandb, "init", boom)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    MetricsLogger(logging_cfg(wandb_mode="offline"), tmp_path / "a", total_steps=1).finish()
    assert os.environ["WANDB_SILENT"] == "true"
    monkeypatch.setenv("WANDB_SILENT", "false")
    MetricsLogger(logging_cfg(wandb_mode="offline"), tmp_path / "b", total_steps=1).finish()
    assert os.environ["WANDB_SILENT"] == "false"


def test_log_failure_warns_once_and_stops_logging(capsys: pytest.CaptureFixture[str]) -> None:
    class BrokenRun:
        dir = ""
        calls = 0

        def log(self, payload: dict) -> None:
            BrokenRun.calls += 1
            raise OSError("disk full")

    sink = WandbSink(BrokenRun())
    sink.log("train", 1, {"loss": 1.0})
    sink.log("train", 2, {"loss": 1.0})
    assert BrokenRun.calls == 1 and sink.run is None
    assert capsys.readouterr().err.count("wandb log failed") == 1
    assert sink.close() == {"wandb": ""}
