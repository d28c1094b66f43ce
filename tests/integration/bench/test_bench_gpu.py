"""tools/bench_gpu.sh in its dry mode (no CUDA here): the same code path as the 1B GPU run, on the tiny model."""

import json
from pathlib import Path

from tests.launch import run


def test_dry_run_reports_n1_and_n4(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run_ = run(["bash", "tools/bench_gpu.sh", "--dry-run", "--json", str(out)], timeout=180)
    assert run_.returncode == 0, run_.stderr[-3000:]
    assert "DRY RUN" in run_.stdout, run_.stdout
    assert "time ratio n4/n1" in run_.stdout, run_.stdout
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    rows = {r["n"]: r for r in result["rows"]}
    assert set(rows) == {1, 4}, result["rows"]
    for n, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0, (n, row)
        assert row["step_s"] > 0 and len(row["step_times_s"]) == result["steps"]
    assert result["flop_ratio"] > 1.0  # n=4 adds three unembeddings at the same L
