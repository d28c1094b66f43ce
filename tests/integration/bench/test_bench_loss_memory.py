"""tools/bench_loss_memory.py measures what the memory-efficient loss is for: one run, its printed table."""

import re

from tests.launch import tool as run_tool

ROW = re.compile(r"^\s*(\d+)\s+(naive|efficient|chunked\(\d+\))\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def test_naive_mtp_peaks_far_above_efficient_and_chunked():
    # Sizes: one head's fp32 logits are 8 MiB, well above the CPU RSS method's noise (< 0.5 MiB);
    # the whole run stays near 20 s on 2 cores. Only n=4 is measured (so the table's reference is n=4).
    args = [
        "--vocab",
        "8192",
        "--seq",
        "128",
        "--batch",
        "2",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--trunk-layers",
        "1",
        "--chunk",
        "32",
        "--n",
        "4",
        "--repeat",
        "1",
    ]
    run = run_tool("bench_loss_memory.py", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {
        (int(m[1]), m[2].split("(")[0]): float(m[3]) for m in map(ROW.match, run.stdout.splitlines()) if m
    }
    assert set(rows) == {(4, "naive"), (4, "efficient"), (4, "chunked")}, run.stdout
    naive, efficient, chunked = rows[4, "naive"], rows[4, "efficient"], rows[4, "chunked"]
    assert efficient > 1.0  # a real measurement, not an empty one
    assert naive > 1.5 * efficient, run.stdout
    assert chunked < efficient, run.stdout
    assert "x efficient n=4" in run.stdout
