"""tools/bench_determinism.py times training steps with trainer.deterministic on vs off: one tiny run, its JSON."""

import json

from tests.launch import tool as run_tool


def test_deterministic_on_vs_off_step_time(tmp_path):
    out = tmp_path / "bench.json"
    args = "--hidden 32 --heads 2 --trunk-layers 1 --n 2 --seq 16 --batch 2 --vocab 256 --steps 1"
    run = run_tool("bench_determinism.py", *args.split(), "--json", str(out), timeout=150)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]

    result = json.loads(out.read_text())
    assert set(result["step_s"]) == {"on", "off"} and all(s > 0 for s in result["step_s"].values())
    assert result["slowdown"] == result["step_s"]["on"] / result["step_s"]["off"]
    # the same model, batches and CPU kernels: deterministic mode changes no result here, only guarantees it
    assert result["same_losses"] is True
    assert f"on / off: {result['slowdown']:.3f}x step time" in run.stdout
