"""Console sink: the line formats and the progress bar on a terminal."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtp_pretrain.metrics import console
from mtp_pretrain.metrics.console import ConsoleSink, format_duration, format_train_line, format_val_line
from mtp_pretrain.metrics.logger import MetricsLogger
from tests.unit.metrics.conftest import logging_cfg, train_metrics


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (45.4, "45s"),
        (83, "1m23s"),
        (65, "1m05s"),
        (2 * 3600 + 5 * 60 + 10, "2h05m"),
        (3 * 86400 + 4 * 3600, "3d04h"),
        (-1, "?"),
        (float("inf"), "?"),
        (float("nan"), "?"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


def test_format_train_line_matches_spec() -> None:
    m = {
        "loss": 9.123,
        "loss/head1": 2.01,
        "loss/head2": 2.30,
        "loss/head3": 2.41,
        "loss/head4": 2.40,
        "lr": 3e-4,
        "grad_norm": 0.81,
        "tokens_per_s": 12300.0,
        "mfu": 0.012,
    }
    line = format_train_line(120, 400, m, eta_s=83)
    assert line == (
        "step 120/400 | loss 9.12 | h1 2.01 h2 2.30 h3 2.41 h4 2.40 | lr 3.0e-04 | gnorm 0.81 "
        "| 12.3k tok/s | mfu 1.2% | eta 1m23s"
    )


def test_format_val_line() -> None:
    line = format_val_line(100, {"loss": 2.4, "loss/head1": 2.01, "acc/head1": 0.452, "loss/head2": 2.3})
    assert line == "val step 100 | loss 2.40 | h1 2.01 acc1 0.452 h2 2.30"


def test_format_val_line_with_draft_acceptance() -> None:
    m = {
        "loss/head1": 2.01,
        "loss/head2": 2.3,
        "accept_3": 0.1234,
        "accept_2": 0.3,
        "tokens_per_forward": 1.5,
    }
    assert format_val_line(7, m) == "val step 7 | h1 2.01 h2 2.30 | accept 2:0.30 3:0.12 | 1.50 tok/fwd"


def test_tty_mode_uses_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "_stdout_is_tty", lambda: True)
    lg = MetricsLogger(logging_cfg(log_every=5), tmp_path / "run", total_steps=10, start_step=2, n_heads=2)
    sink = next(s for s in lg.sinks if isinstance(s, ConsoleSink))
    assert sink.bar is not None and sink.bar.n == 2
    for s in range(3, 8):
        lg.log_train(s, train_metrics(s, 2))
    assert sink.bar.n == 7
    assert "h1 " in sink.bar.postfix and "h2 " in sink.bar.postfix and "tok/s" in sink.bar.postfix
    lg.finish()
    assert sink.bar is None
