"""tools/bench.py runs the benchmark tools as children and summarises them (a tiny subset here)."""

import json

from tests.launch import tool as run_tool

TINY_MEMORY = (
    "--vocab 2048 --seq 32 --batch 2 --hidden 32 --heads 2 --trunk-layers 1 --chunk 16 --n 1 2 --repeat 1"
)


def test_suite_writes_json_png_and_the_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\nafter\n")
    args = [
        "--only",
        "memory,step",
        "--out",
        str(tmp_path / "bench"),
        "--readme",
        str(readme),
        "--args",
        f"memory_v32k={TINY_MEMORY}",
        "--args",
        f"memory_v128k={TINY_MEMORY.replace('2048', '4096')}",
        "--args",
        "step=--hidden 32 --heads 2 --trunk-layers 1 --seq 32 --batch 2 --vocab 512 --steps 1",
    ]
    run = run_tool("bench.py", *args, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert set(result["raw"]) == {"memory_v32k", "memory_v128k", "step"}
    names = [row[0] for row in result["summary"]]
    backend = result["raw"]["step"]["result"]["attention"]  # sdpa here (auto without TransformerEngine)
    assert names == [f"loss-step peak memory, V={v}k, n={n}" for v in (2, 4) for n in (1, 2)] + [
        f"step time n=4 / n=1 (same trunk, attention {backend})"
    ]
    assert (tmp_path / "bench" / "results.png").stat().st_size > 10_000
    text = readme.read_text()
    assert (
        "old table" not in text
        and f"| step time n=4 / n=1 (same trunk, attention {backend}) |" in text
        and text.endswith("after\n")
    )
    assert "this run:" in run.stdout
