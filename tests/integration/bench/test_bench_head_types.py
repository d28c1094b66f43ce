"""tools/bench_head_types.py compares the MTP head types' training steps with parallel's: one tiny run, its JSON."""

import json
import math
import re

from tests.launch import tool as run_tool

ROW = re.compile(
    r"^(\w+)\s+[\d,]+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+) -> ([\d.]+)\s+(yes|NO)\s*$"
)


def test_head_types_memory_and_time_over_parallel(tmp_path):
    # Tiny sizes: one head's fp32 logits are 2 MiB (well above the RSS method's noise). Two types, the
    # reference and the chained one with the most parts (sequential: embeddings, eh_proj, own norms), keep
    # it to three processes (two memory runs + the timed one), ~25 s on 2 cores, mostly imports; the other
    # types differ only in the head_type the same builder passes on.
    out = tmp_path / "bench.json"
    args = "--hidden 32 --heads 2 --trunk-layers 1 --n 4 --seq 64 --batch 2 --vocab 4096 --steps 2 --warmup 1"
    run = run_tool(
        "bench_head_types.py", *args.split(), "--types", "sequential", "--json", str(out), timeout=150
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]

    result = json.loads(out.read_text())
    assert result["config"]["reference"] == "parallel" and result["config"]["attention"] == "local"
    rows = {r["head_type"]: r for r in result["rows"]}
    assert list(rows) == ["parallel", "sequential"]  # the reference always runs, first
    for name, r in rows.items():
        for key in ("peak_mib", "rss_peak_mib", "step_s", "params", "loss_first", "loss_last"):
            assert r[key] > 0, (name, key, r)
        assert len(r["step_times_s"]) == 2
        assert len(r["losses"]) == 3 and all(len(s) == 4 for s in r["losses"])  # every step, every head
        # one fixed batch for every step: its loss must fall
        assert r["loss_decreased"] is True, r["losses"]
        assert r["memory_ratio"] == r["peak_mib"] / rows["parallel"]["peak_mib"]
        assert r["time_ratio"] == r["step_s"] / rows["parallel"]["step_s"]
        assert math.isfinite(r["memory_ratio"]) and math.isfinite(r["time_ratio"])
    assert rows["parallel"]["memory_ratio"] == rows["parallel"]["time_ratio"] == 1.0
    # sequential heads 2..n add enorm, hnorm, eh_proj (2d x d, no bias) and a final norm each
    d = 32
    assert rows["sequential"]["params"] - rows["parallel"]["params"] == 3 * (2 * d * d + 3 * d)

    printed = {m[1]: m for m in map(ROW.match, run.stdout.splitlines()) if m}
    assert set(printed) == set(rows), run.stdout
    for name, m in printed.items():  # the table prints the JSON's figures
        # printed with 3 (seconds), 2 (ratios) and 1 (MiB) decimals: bounds of half a last digit, doubled
        assert abs(float(m[2]) - rows[name]["step_s"]) <= 1e-3
        assert abs(float(m[3]) - rows[name]["time_ratio"]) <= 1e-2
        assert abs(float(m[4]) - rows[name]["peak_mib"]) <= 0.1
        assert abs(float(m[5]) - rows[name]["memory_ratio"]) <= 1e-2
