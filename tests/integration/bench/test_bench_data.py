"""tools/bench_data.py measures loader throughput against the training step's consumption: one small run."""

import json
import re

from tests.launch import tool as run_tool

ROW = re.compile(r"^(text|tokens)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(yes|no)\s*$")
CONSUMPTION = re.compile(r"^training consumption: ([\d.]+) tokens/s")


def test_loader_rows_and_ratio_to_training_consumption(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):  # a small corpus: fast tokenizer training, 6 shards of 5 docs (5 train + 1 val)
        body = "\n".join(f"def f_{i}_{j}(x, y={j}):\n    return x * y + {i}\n" for j in range(8))
        (src / f"mod_{i:03d}.py").write_text(f"import os\n\n{body}\n")
    out = tmp_path / "bench.json"
    args = [
        "--source",
        str(src),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--vocab-size",
        "300",
        "--docs-per-shard",
        "5",
        "--workers",
        "0,1",
        "--seconds",
        "0.3",
        "--min-batches",
        "5",
        "--train-steps",
        "3",
        "--warmup-steps",
        "1",
        "--json",
        str(out),
        "trainer.micro_batch_size=4",
        "model.seq_len=64",
    ]
    run = run_tool("bench_data.py", *args)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    rows = {(m[1], int(m[2])): m for m in map(ROW.match, lines) if m}
    assert set(rows) == {("text", 0), ("text", 1), ("tokens", 0), ("tokens", 1)}, run.stdout
    consumption = [float(m[1]) for m in map(CONSUMPTION.match, lines) if m]
    assert len(consumption) == 1 and consumption[0] > 0, run.stdout
    for m in rows.values():
        loader_tps, ratio = float(m[4]), float(m[5])
        assert loader_tps > 0 and ratio > 0, m[0]
        assert abs(ratio - loader_tps / consumption[0]) <= 0.02 * ratio + 0.1, m[0]  # ratio of the columns
        assert (m[6] == "yes") == (ratio >= 20), m[0]
    assert "measured in one run on this machine" in run.stdout
    assert "target: loader >= 20x consumption" in run.stdout

    result = json.loads(out.read_text())
    assert result["config"]["micro_batch_size"] == 4 and result["config"]["sample_len"] == 64 + 4
    assert result["consumption"]["tokens_per_step"] == 4 * 64
    assert [(r["content"], r["workers"]) for r in result["rows"]] == [
        ("text", 0),
        ("text", 1),
        ("tokens", 0),
        ("tokens", 1),
    ]
    assert all(r["batches"] >= 5 for r in result["rows"])
