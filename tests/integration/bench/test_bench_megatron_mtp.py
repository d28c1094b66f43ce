"""tools/bench_megatron_mtp.py compares our MTP (parallel and sequential heads) with megatron-core's built-in MTP:
one tiny run, its JSON."""

import json
import re

from tests.launch import tool as run_tool

ROW = re.compile(
    r"^(ours|megatron|ours-sequential|ours-sequential-kept)\s+[\d,]+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+) -> ([\d.]+)\s+(yes|NO)\s*$"
)


def test_megatron_mtp_vs_ours_memory_and_time(tmp_path):
    # Tiny sizes: one prediction's fp32 logits are 2 MiB (well above the RSS method's noise); four
    # processes (four memory runs + the timed one) stay near 35 s on 2 cores, mostly imports.
    out = tmp_path / "bench.json"
    args = [
        "--hidden",
        "32",
        "--heads",
        "2",
        "--trunk-layers",
        "1",
        "--seq",
        "64",
        "--batch",
        "2",
        "--vocab",
        "4096",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
    ]
    run = run_tool("bench_megatron_mtp.py", *args, timeout=150)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]

    result = json.loads(out.read_text())
    for name in ("ours", "megatron", "ours_sequential", "ours_sequential_kept"):
        for key in ("peak_mib", "rss_peak_mib", "step_s", "params", "loss_first", "loss_last"):
            assert result[f"{name}_{key}"] > 0, (name, key, result)
        assert len(result[f"{name}_step_times_s"]) == 2
        assert len(result[f"{name}_losses"]) == 3 and all(len(s) == 4 for s in result[f"{name}_losses"])
        # one fixed batch for every step: its loss must fall
        assert result[f"{name}_loss_decreased"] is True, result[f"{name}_losses"]
    assert result["memory_ratio"] == result["megatron_peak_mib"] / result["ours_peak_mib"]
    assert result["time_ratio"] == result["megatron_step_s"] / result["ours_step_s"]
    assert (
        result["sequential_memory_ratio"] == result["ours_sequential_peak_mib"] / result["megatron_peak_mib"]
    )
    assert result["sequential_time_ratio"] == result["ours_sequential_step_s"] / result["megatron_step_s"]
    # megatron keeps every depth's logits alive until backward; ours one head's at a time, also for the
    # same (sequential) design: 4 predictions' logits against 1 (+ the step's other activations)
    assert result["memory_ratio"] > 1.2, result
    assert result["sequential_memory_ratio"] < 1 / 1.2, result
    # the same design: megatron's MTP modules and ours-sequential's heads have the same parameters
    assert (
        result["ours_sequential_params"] == result["megatron_params"] == result["ours_sequential_kept_params"]
    )
    # the same model and batch whether the chained heads' forwards are re-run or their graphs kept: the
    # same losses (the same fp32 operations on the same values)
    assert result["ours_sequential_kept_losses"] == result["ours_sequential_losses"], result

    rows = {m[1]: m for m in map(ROW.match, run.stdout.splitlines()) if m}
    assert set(rows) == {"ours", "megatron", "ours-sequential", "ours-sequential-kept"}, run.stdout
    for name in rows:  # the table prints the JSON's figures
        key = name.replace("-", "_")
        # printed with 3 (seconds) and 1 (MiB) decimals: the bounds are twice the rounding (half a last digit)
        assert abs(float(rows[name][2]) - result[f"{key}_step_s"]) <= 1e-3
        assert abs(float(rows[name][3]) - result[f"{key}_peak_mib"]) <= 0.1
    assert re.search(r"megatron / ours: memory [\d.]+x, time [\d.]+x", run.stdout), run.stdout
    assert re.search(r"ours-sequential / megatron: memory [\d.]+x, time [\d.]+x", run.stdout), run.stdout
