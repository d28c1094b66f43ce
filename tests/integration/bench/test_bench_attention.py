"""tools/bench_attention.py compares the core attention backends sdpa and local: one tiny run, its JSON."""

import json
import re

from tests.launch import tool as run_tool

ROW = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)x\s*$")


def test_sdpa_vs_local_time_and_memory(tmp_path):
    # Tiny sizes, T=256 and 512: local's per-layer fp32 scores and probabilities are 2 and 8 MiB at B=2 with
    # 4 heads, above the RSS method's noise; one process, ~15 s on 2 cores, mostly imports.
    out = tmp_path / "bench.json"
    args = "--hidden 32 --heads 4 --trunk-layers 1 --seq 256 --batch 2 --vocab 512 --steps 1"
    run = run_tool("bench_attention.py", *args.split(), "--json", str(out), timeout=150)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]

    result = json.loads(out.read_text())
    rows = {r["seq"]: r for r in result["rows"]}
    assert set(rows) == {256, 512}
    for r in rows.values():
        for name in ("sdpa", "local"):
            assert r[f"{name}_step_s"] > 0 and r[f"{name}_peak_mib"] > 0, r
            assert len(r[f"{name}_step_times_s"]) == 1
        assert r["time_ratio"] == r["sdpa_step_s"] / r["local_step_s"]
        assert r["memory_ratio"] == r["sdpa_peak_mib"] / r["local_peak_mib"]
    # local keeps 2 x 8 MiB of T x T tensors per layer at T=512 that sdpa never allocates
    assert rows[512]["memory_ratio"] < 0.9, rows[512]

    printed = {int(m[1]): m for m in map(ROW.match, run.stdout.splitlines()) if m}
    assert set(printed) == {256, 512}, run.stdout
    for seq, m in printed.items():  # the table prints the JSON's figures
        # printed with 3 (seconds) and 1 (MiB) decimals: the bounds are twice the rounding (half a last digit)
        assert abs(float(m[2]) - rows[seq]["sdpa_step_s"]) <= 1e-3
        assert abs(float(m[5]) - rows[seq]["local_peak_mib"]) <= 0.1
