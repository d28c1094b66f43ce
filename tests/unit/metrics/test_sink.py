"""The sink interface: a sink gets exactly the emitted records, and close() feeds finish()'s paths."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mtp_pretrain.metrics import MetricSink
from mtp_pretrain.metrics.logger import MetricsLogger
from mtp_pretrain.metrics.sink import ProgressSink, head_ids
from tests.unit.metrics.conftest import logging_cfg, train_metrics


class FakeSink:
    def __init__(self) -> None:
        self.records: list[tuple[str, int, dict[str, float]]] = []
        self.closed = 0

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        self.records.append((split, step, dict(metrics)))

    def close(self) -> dict[str, str]:
        self.closed += 1
        return {"fake": "fake.out"}


def test_heads_sorted_numerically() -> None:
    m = {f"loss/head{k}": float(k) for k in (10, 2, 1)}
    assert head_ids(m) == [1, 2, 10]


def test_fake_sink_receives_exactly_the_emitted_records(tmp_path: Path) -> None:
    fake = FakeSink()
    sink: MetricSink = fake  # structural: a sink needs no base class
    assert not isinstance(sink, ProgressSink)  # no progress(): it sees emitted records only
    lg = MetricsLogger(logging_cfg(log_every=3, plot=False), tmp_path / "run", total_steps=7, n_heads=2)
    lg.sinks.append(fake)
    for s in range(1, 8):
        lg.log_train(s, train_metrics(s, 2))
    lg.log_val(7, {"loss": 2.5, "loss/head1": 2.4, "loss/head2": 2.6})

    emitted = [(split, step) for split, step, _ in fake.records]
    assert emitted == [("train", 1), ("train", 3), ("train", 6), ("train", 7), ("val", 7)]
    # the same reduced values the history (and so metrics.jsonl) holds, without the record's time stamp
    meta = ("split", "step", "time")
    expected = [(r["split"], r["step"], {k: v for k, v in r.items() if k not in meta}) for r in lg.history]
    assert fake.records == expected

    paths = lg.finish()
    assert paths["fake"] == "fake.out" and fake.closed == 1
    assert lg.finish() == paths and fake.closed == 1  # finish is idempotent: sinks close once
    lg.log_train(8, train_metrics(8, 2))  # after finish: ignored
    assert len(fake.records) == 5
