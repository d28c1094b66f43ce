"""The benchmark suite: every benchmark in one process tree, one table of ratios measured in the same run.

    make bench                      # = python tools/bench.py --readme
    python tools/bench.py [--only memory,decode] [--model outputs/tiny-n4] [--out bench/]

Each benchmark is its own tool (run here as a child process, as a user would run it, so one cannot skew
another's memory figures); this script only runs them, collects their JSON and summarises:

    memory      tools/bench_loss_memory.py   loss-step peak: naive vs memory-efficient vs chunked CE,
                                             n in {1, 2, 4, 8}, V in {32k, 128k}
    step        tools/bench_step.py          step time n=4 / n=1 over the FLOP ratio (same trunk)
    megatron    tools/bench_megatron_mtp.py  the same trunk with megatron-core's built-in MTP (DeepSeek-style
                                             mtp_num_layers): peak memory and step time vs ours (parallel
                                             heads) and vs ours with sequential heads (the same design)
    heads       tools/bench_head_types.py    every mtp.head_type's training-step peak memory and step time
                                             over parallel's (same shape as megatron's)
    attention   tools/bench_attention.py     core attention model.attention=sdpa vs local: step time and
                                             peak memory at T=1024 and 2048
    determinism tools/bench_determinism.py   step time with trainer.deterministic on vs off
    data        tools/bench_data.py          data-loader tokens/s over the training step's consumption
    decode      tools/bench_decode.py        self-speculative vs greedy decoding, batch 1 and 8, on the
                                             main job's model (trained first with the default config if
                                             --model has no checkpoint)

Writes <out>/results.json (the summary + every tool's raw JSON), <out>/results.png, <out>/results.md, and
with --readme the table between the bench markers of README.md. Only ratios are claims: absolute CPU
times on a shared 2-core machine mean nothing elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from mtp_pretrain.bench.options import bench_parser, write_json
from mtp_pretrain.processes import child_env

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"

# (name, tool, arguments): sizes chosen so the whole suite stays well under 15 minutes on 2 CPU cores
MEMORY_SHAPE = "--seq 256 --batch 2 --hidden 256 --trunk-layers 2 --chunk 64 --n 1 2 4 8 --repeat 1".split()
SUITE = {
    "memory_v32k": ("bench_loss_memory.py", ["--vocab", "32768", *MEMORY_SHAPE]),
    "memory_v128k": ("bench_loss_memory.py", ["--vocab", "131072", *MEMORY_SHAPE]),
    "step": ("bench_step.py", ["--steps", "4"]),
    "megatron": ("bench_megatron_mtp.py", []),
    "head_types": ("bench_head_types.py", ["--steps", "2"]),  # 5 models: 3 rounds of 5 steps
    "attention": ("bench_attention.py", []),
    "determinism": ("bench_determinism.py", ["--steps", "6"]),
    "data": ("bench_data.py", ["--seconds", "1.5", "--train-steps", "6"]),
    "decode": ("bench_decode.py", []),
}
GROUPS = {
    "memory": ["memory_v32k", "memory_v128k"],
    "step": ["step"],
    "megatron": ["megatron"],
    "heads": ["head_types"],
    "attention": ["attention"],
    "determinism": ["determinism"],
    "data": ["data"],
    "decode": ["decode"],
}


def run_tool(name: str, tool: str, args: list[str], raw_dir: Path, timeout: int) -> dict:
    """Run one tool, streaming its output, in a world of its own; its --json result (or the failure)
    comes back."""
    out = raw_dir / f"{name}.json"
    out.unlink(missing_ok=True)
    print(f"\n=== {name}: python tools/{tool} {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    try:
        cmd = [sys.executable, str(TOOLS / tool), *args, "--json", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = time.perf_counter() - t0
    if rc != 0 or not out.is_file():
        print(f"=== {name}: FAILED ({rc}) after {seconds:.0f}s", flush=True)
        return {"error": f"exit {rc}", "seconds": seconds}
    print(f"=== {name}: {seconds:.0f}s", flush=True)
    return {"result": json.loads(out.read_text()), "seconds": seconds}


def ensure_model(model: Path, timeout: int) -> None:
    """The decode benchmark needs the main job's model: train it (make train's recipe) when absent."""
    if (model / "checkpoints" / "latest").is_file() or (model / "mtp_checkpoint.json").is_file():
        return
    print(f"\n=== no checkpoint in {model}: running the main job first (make train)", flush=True)
    subprocess.run(
        [sys.executable, "-m", "mtp_pretrain.cli", "+experiment=cpu_demo"],
        cwd=REPO,
        env=child_env(),
        timeout=timeout,
        check=True,
    )


# -- the summary --------------------------------------------------------------------------------------
def _memory_rows(raw: dict) -> list[list[str]]:
    rows = []
    for name in GROUPS["memory"]:
        res = raw.get(name, {}).get("result")
        if not res:
            continue
        v = res["shape"]["vocab"]
        peak = {(r["n"], r["mode"].split("(")[0]): r["peak_bytes"] / 2**20 for r in res["rows"]}
        for n in sorted({r["n"] for r in res["rows"]}):
            naive, eff, chunk = peak[n, "naive"], peak[n, "efficient"], peak[n, "chunked"]
            rows.append(
                [
                    f"loss-step peak memory, V={v // 1024}k, n={n}",
                    f"naive {naive:.0f} / efficient {eff:.0f} / chunked {chunk:.0f} MiB",
                    f"naive {naive / eff:.2f}x, chunked {chunk / eff:.2f}x of efficient; "
                    f"efficient {eff / peak[1, 'efficient']:.2f}x its n=1",
                ]
            )
    return rows


def _head_type_rows(raw: dict) -> list[list[str]]:
    res = raw.get("head_types", {}).get("result")
    if not res:
        return []
    c = res["config"]
    ref = next(r for r in res["rows"] if r["head_type"] == c["reference"])
    rows = []
    for r in res["rows"]:
        measured = f"peak {r['peak_mib']:.0f} MiB, step {r['step_s']:.3f} s"
        if r is not ref:
            measured = (
                f"peak {r['peak_mib']:.0f} vs {ref['peak_mib']:.0f} MiB, "
                f"step {r['step_s']:.3f} vs {ref['step_s']:.3f} s"
            )
        rows.append(
            [
                f"MTP head type {r['head_type']}, n={c['n']}: training-step peak memory / step time "
                f"÷ {c['reference']} (attention {c['attention']})",
                measured,
                f"memory {r['memory_ratio']:.2f}x, time {r['time_ratio']:.2f}x",
            ]
        )
    return rows


def summarise(raw: dict) -> list[list[str]]:
    """[benchmark, measured, ratio] rows of everything that ran."""
    rows = _memory_rows(raw)
    if res := raw.get("step", {}).get("result"):
        rows.append(
            [
                f"step time n=4 / n=1 (same trunk, attention {res.get('attention', 'local')})",
                f"time {res['time_ratio']:.3f}x, FLOPs {res['flop_ratio']:.3f}x",
                f"time/FLOP {res['time_over_flops']:.3f} (target <= 1.05)",
            ]
        )
    if res := raw.get("megatron", {}).get("result"):
        rows.append(
            [
                "megatron-core built-in MTP vs ours, same trunk + 3 extra layers, attention "
                + res.get("config", {}).get("attention", "local"),
                f"peak {res['megatron_peak_mib']:.0f} vs {res['ours_peak_mib']:.0f} MiB, "
                f"step {res['megatron_step_s']:.3f} vs {res['ours_step_s']:.3f} s",
                f"megatron/ours: memory {res['memory_ratio']:.2f}x, time {res['time_ratio']:.2f}x",
            ]
        )
        if "sequential_memory_ratio" in res:  # results before ours-sequential joined lack it
            rows.append(
                [
                    "ours sequential heads (DeepSeek-V3 MTP modules) vs megatron-core built-in MTP, same design, "
                    "attention " + res.get("config", {}).get("attention", "local"),
                    f"peak {res['ours_sequential_peak_mib']:.0f} vs {res['megatron_peak_mib']:.0f} MiB, "
                    f"step {res['ours_sequential_step_s']:.3f} vs {res['megatron_step_s']:.3f} s",
                    f"sequential/megatron: memory {res['sequential_memory_ratio']:.2f}x, "
                    f"time {res['sequential_time_ratio']:.2f}x (goal: memory < 1, time <= 1.0)",
                ]
            )
        if "sequential_kept_memory_ratio" in res:
            rows.append(
                [
                    "the same, mtp.chain_recompute=false (every head's activations kept, no re-run forward)",
                    f"peak {res['ours_sequential_kept_peak_mib']:.0f} vs {res['megatron_peak_mib']:.0f} MiB, "
                    f"step {res['ours_sequential_kept_step_s']:.3f} vs {res['megatron_step_s']:.3f} s",
                    f"sequential/megatron: memory {res['sequential_kept_memory_ratio']:.2f}x, "
                    f"time {res['sequential_kept_time_ratio']:.2f}x",
                ]
            )
    rows += _head_type_rows(raw)
    if res := raw.get("attention", {}).get("result"):
        for r in res["rows"]:
            rows.append(
                [
                    f"core attention sdpa vs local, T={r['seq']}",
                    f"step {r['sdpa_step_s']:.3f} vs {r['local_step_s']:.3f} s, "
                    f"peak {r['sdpa_peak_mib']:.0f} vs {r['local_peak_mib']:.0f} MiB",
                    f"sdpa/local: time {r['time_ratio']:.2f}x, memory {r['memory_ratio']:.2f}x",
                ]
            )
    if res := raw.get("determinism", {}).get("result"):
        rows.append(
            [
                "trainer.deterministic=true vs false (cpu_demo model)",
                f"step {res['step_s']['on']:.3f} vs {res['step_s']['off']:.3f} s, same losses: {res['same_losses']}",
                f"on/off: time {res['slowdown']:.2f}x",
            ]
        )
    if res := raw.get("data", {}).get("result"):
        worst = min(res["rows"], key=lambda r: r["ratio"])
        rows.append(
            [
                "data loader / training consumption",
                ", ".join(f"{r['content']} w{r['workers']} {r['ratio']:.0f}x" for r in res["rows"]),
                f"min {worst['ratio']:.0f}x (target >= 20x)",
            ]
        )
    if res := raw.get("decode", {}).get("result"):
        for r in res["rows"]:
            rows.append(
                [
                    f"self-speculative decoding, batch {r['batch']}, n={res['heads']}",
                    f"{r['speculative_tok_s']:.0f} vs {r['greedy_tok_s']:.0f} tok/s, "
                    f"{r['tokens_per_forward']:.2f} tokens/forward, identical={r['identical']}",
                    f"{r['speedup']:.2f}x greedy (target >= 2.5x at batch 1); mtp-generate's default (stops "
                    f"drafting that does not pay) {r['auto_speedup']:.2f}x; with perfect drafts "
                    f"{r['perfect_drafts_speedup']:.2f}x "
                    f"({r['perfect_tokens_per_forward']:.2f} tokens/forward)",
                ]
            )
    for name, entry in raw.items():
        if "error" in entry:
            rows.append([name, "FAILED", entry["error"]])
    return rows


def markdown(rows: list[list[str]]) -> str:
    lines = ["| benchmark | measured (this run) | ratio |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows]) + "\n"


def plot(raw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for name, style in zip(GROUPS["memory"], ("-", "--"), strict=True):
        res = raw.get(name, {}).get("result")
        if not res:
            continue
        for mode in ("naive", "efficient", "chunked"):
            pts = sorted((r["n"], r["peak_bytes"] / 2**20) for r in res["rows"] if r["mode"].startswith(mode))
            axes[0].plot(
                *zip(*pts, strict=True), style, marker="o", label=f"{mode} V={res['shape']['vocab'] // 1024}k"
            )
    axes[0].set(xlabel="heads n", ylabel="peak MiB", title="loss-step peak memory")
    axes[0].legend(fontsize=7)
    bars: dict[str, float] = {}
    if res := raw.get("megatron", {}).get("result"):
        bars |= {"megatron MTP\nmemory": res["memory_ratio"], "megatron MTP\ntime": res["time_ratio"]}
        if "sequential_memory_ratio" in res:
            bars |= {
                "sequential /\nmegatron mem.": res["sequential_memory_ratio"],
                "sequential /\nmegatron time": res["sequential_time_ratio"],
            }
    if res := raw.get("step", {}).get("result"):
        bars["n4/n1 time\n/ FLOPs"] = res["time_over_flops"]
    axes[1].bar(list(bars), list(bars.values()), color="tab:gray")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set(title="ratios (1.0 = parity with ours / megatron / FLOPs)")
    axes[1].tick_params(axis="x", labelsize=7)
    if res := raw.get("head_types", {}).get("result"):
        types = [r["head_type"] for r in res["rows"]]
        x = range(len(types))
        axes[3].bar([i - 0.2 for i in x], [r["memory_ratio"] for r in res["rows"]], 0.4, label="peak memory")
        axes[3].bar([i + 0.2 for i in x], [r["time_ratio"] for r in res["rows"]], 0.4, label="step time")
        axes[3].axhline(1.0, color="k", lw=0.8)
        axes[3].set_xticks(list(x), types)
        top = max(max(r["memory_ratio"], r["time_ratio"]) for r in res["rows"])
        axes[3].set_ylim(0, 1.3 * top)  # room for the legend above the bars
        axes[3].legend(loc="upper left", ncol=2)
    axes[3].set(title="head types ÷ parallel (training step)")
    if res := raw.get("decode", {}).get("result"):
        labels = [f"batch {r['batch']}" for r in res["rows"]]
        x = range(len(labels))
        axes[2].bar([i - 0.27 for i in x], [r["greedy_tok_s"] for r in res["rows"]], 0.27, label="greedy")
        axes[2].bar(
            list(x), [r["speculative_tok_s"] for r in res["rows"]], 0.27, label="self-speculative (heads)"
        )
        perfect = [r["greedy_tok_s"] * r["perfect_drafts_speedup"] for r in res["rows"]]
        axes[2].bar([i + 0.27 for i in x], perfect, 0.27, label="perfect drafts (ceiling)")
        axes[2].set_xticks(list(x), labels)
        axes[2].legend()
    axes[2].set(title="decoding tokens/s", ylabel="tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def update_readme(table: str, readme: Path, partial: bool = False) -> None:
    """Write ``table`` between the README's bench markers. ``partial`` (a run of some benchmarks only): keep
    the other rows, replacing those with the same first cell and appending new ones."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} section to fill")
    head, rest = text.split(README_BEGIN, 1)
    old, tail = rest.split(README_END, 1)
    if partial:
        header = table.splitlines()[:2]
        new = {line.split(" | ")[0]: line for line in table.splitlines()[2:]}
        kept = [line for line in old.splitlines() if line.startswith("| ") and line != header[0]]
        rows = [new.pop(line.split(" | ")[0], line) for line in kept] + list(new.values())
        table = "\n".join(header + rows) + "\n"
    stamp = time.strftime("%Y-%m-%d")
    note = f"_Measured by `make bench` on {stamp}; see bench/results.png._"
    readme.write_text(f"{head}{README_BEGIN}\n{note}\n\n{table}{README_END}{tail}")


def main(argv: list[str] | None = None) -> dict:
    p = bench_parser(__doc__, results_json=False)  # the results go to --out
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    p.add_argument("--model", default="outputs/tiny-n4", help="the model the decode benchmark reads")
    p.add_argument("--out", default="bench", help="results directory")
    p.add_argument("--timeout", type=int, default=420, help="seconds allowed to each benchmark")
    p.add_argument(
        "--readme", nargs="?", const="README.md", help="write the table into this README (default README.md)"
    )
    p.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="replace a benchmark's arguments, e.g. --args 'step=--hidden 64 --steps 1'",
    )
    a = p.parse_args(argv)
    unknown = set(a.only.split(",")) - set(GROUPS)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(GROUPS)}")
    overrides = dict(x.split("=", 1) for x in a.args)
    out = REPO / a.out
    (out / "raw").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # a partial run (--only) replaces its benchmarks' entries in the last results and keeps the others
    previous = out / "results.json"
    raw: dict = json.loads(previous.read_text())["raw"] if previous.is_file() else {}
    for group in a.only.split(","):
        for name in GROUPS[group]:
            tool, args = SUITE[name]
            args = overrides[name].split() if name in overrides else list(args)
            if name == "decode":
                ensure_model(REPO / a.model, a.timeout)
                args = ["--model", a.model, *args]
            raw[name] = run_tool(name, tool, args, out / "raw", a.timeout)
    rows = summarise(raw)
    table = markdown(rows)
    total = time.perf_counter() - t0
    result = {"seconds": total, "summary": rows, "raw": raw}
    write_json(out / "results.json", result)
    (out / "results.md").write_text(table)
    plot(raw, out / "results.png")
    print(f"\n{table}\nthis run: {total / 60:.1f} min; wrote {out}/results.json, results.md, results.png")
    if a.readme:
        update_readme(table, REPO / a.readme, partial=set(a.only.split(",")) != set(GROUPS))
        print(f"{a.readme}: benchmark table updated")
    if any("error" in e for e in raw.values()):
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
