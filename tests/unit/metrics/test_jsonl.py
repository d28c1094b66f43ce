"""metrics.jsonl sink: the record format, appended across sessions."""

from __future__ import annotations

import time
from pathlib import Path

from mtp_pretrain.metrics.jsonl import JsonlSink
from tests.unit.metrics.conftest import read_jsonl


def test_records_are_appended_in_the_shared_format(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"split": "train", "step": 1, "time": 0.0, "loss": 5.0}\n')  # an earlier session
    before = time.time()
    sink = JsonlSink(path)
    sink.log("train", 2, {"loss": 4.0, "loss/head1": 4.0})
    sink.log("val", 2, {"loss": 4.5})
    assert sink.close() == {}
    recs = read_jsonl(path)
    assert [(r["split"], r["step"]) for r in recs] == [("train", 1), ("train", 2), ("val", 2)]
    assert list(recs[1]) == ["split", "step", "time", "loss", "loss/head1"]
    # time is rounded to 1 ms when written, so it may read up to 0.5 ms before `before`
    assert recs[1]["time"] >= before - 1e-3 and recs[2]["loss"] == 4.5


def test_unwritable_file_warns_instead_of_raising(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    sink = JsonlSink(tmp_path / "missing_dir" / "metrics.jsonl")
    sink.log("train", 1, {"loss": 1.0})
    assert "could not append" in capsys.readouterr().err
