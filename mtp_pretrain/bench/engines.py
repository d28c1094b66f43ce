"""Peak memory per rank: the megatron engine vs DeepSpeed ZeRO 1/2/3, same model, same batches, 2 ranks.

Each configuration builds the n=4 model and its engine and runs a few training steps; the figure is the
rank's peak memory over that, above what the process held before building the model (imports, data):
parameters, gradients, optimizer state, activations and temporaries. ZeRO-3 runs the naive loss
(mtp.memory_efficient=false; see mtp_pretrain/engine/deepspeed.py), so its activations include all n
heads' logits. Method: on GPUs torch.cuda.max_memory_allocated; on CPU the Linux RSS high-water mark reset
before each configuration (/proc/self/clear_refs) with glibc's mmap threshold pinned low so freed tensors
leave RSS (as tools/bench_loss_memory.py). Ratios to the megatron engine are measured in one run.

    python tools/bench_engines.py [--world-size 2 --hidden 512 --trunk-layers 2 --vocab 32768 --seq 128 --batch 2]
"""

from __future__ import annotations

import os
import sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # must be set before the allocator starts
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402

import torch  # noqa: E402
from benchlib import add_shape_args, bench_model, random_step  # noqa: E402

N = 4
CONFIGS = ["megatron", "zero1", "zero2", "zero3"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> int:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _status_kib("VmHWM") * 1024


def _measure(name: str, args: argparse.Namespace) -> float:
    from megatron.core import parallel_state

    from mtp_pretrain.config import OptimConfig, ParallelConfig
    from mtp_pretrain.engine.deepspeed import DeepSpeedEngine
    from mtp_pretrain.engine.megatron import MegatronEngine

    base = _reset_peak()
    _, _, tconf, model = bench_model(args, N, memory_efficient=name != "zero3")
    optim = OptimConfig(warmup_steps=1)
    if name == "megatron":
        engine = MegatronEngine(model, tconf, optim, 100)
    else:
        engine = DeepSpeedEngine(model, optim, 100, ParallelConfig(engine="deepspeed", zero_stage=int(name[-1])), args.batch, 1)
    g = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
    for _ in range(args.steps):
        random_step(engine, args, args.seq + N, generator=g)
    peak = _peak() - base
    del engine, model
    gc.collect()
    return peak / 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    add_shape_args(p, hidden=512, heads=8, trunk_layers=2, seq=128, batch=2, vocab=32768)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.world_size}",
               __file__, *(argv if argv is not None else sys.argv[1:])]  # fmt: skip
        sys.exit(subprocess.call(cmd))

    from mtp_pretrain import parallel

    parallel.init_distributed()
    rows = {}
    for name in args.configs.split(","):
        mine = _measure(name, args)
        every = [None] * parallel.world_size()
        torch.distributed.all_gather_object(every, mine)
        rows[name] = every
    if parallel.rank() == 0:
        ref = max(rows["megatron"]) if "megatron" in rows else None
        params = (args.vocab * args.hidden * 2 + (args.trunk_layers + N) * 12 * args.hidden**2) / 1e6
        print(f"\npeak memory per rank above the pre-model baseline, {args.world_size} ranks, n={N}, d={args.hidden}, "
              f"{args.trunk_layers}+{N} layers, V={args.vocab} (~{params:.0f}M params), T={args.seq}, B={args.batch}, "
              f"fp32 AdamW, measured in one run")  # fmt: skip
        print(f"{'engine':<10} " + " ".join(f"{'rank ' + str(r):>10}" for r in range(args.world_size)) + f" {'x megatron':>11}")
        for name, peaks in rows.items():
            ratio = f"{max(peaks) / ref:>11.2f}" if ref else ""
            print(f"{name:<10} " + " ".join(f"{m:>8.0f}Mi" for m in peaks) + f" {ratio}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "peak_mib": rows}, f, indent=1)
    parallel.destroy_distributed()


if __name__ == "__main__":
    main()
