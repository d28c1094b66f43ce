"""tools/bench_gpu.sh in its dry mode (no CUDA here): the same code path as the 1B GPU run, on the tiny model."""

import json
import os
import subprocess
from pathlib import Path

from tests.tools.conftest import REPO


def test_dry_run_reports_n1_and_n4(tmp_path: Path) -> None:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    out = tmp_path / "bench.json"
    run = subprocess.run(
        ["bash", "tools/bench_gpu.sh", "--dry-run", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "DRY RUN" in run.stdout, run.stdout
    assert "time ratio n4/n1" in run.stdout, run.stdout
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    rows = {r["n"]: r for r in result["rows"]}
    assert set(rows) == {1, 4}, result["rows"]
    for n, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0, (n, row)
        assert row["step_s"] > 0 and len(row["step_times_s"]) == result["steps"]
    assert result["flop_ratio"] > 1.0  # n=4 adds three unembeddings at the same L
