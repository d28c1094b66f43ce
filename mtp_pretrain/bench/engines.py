"""Peak memory per rank: the megatron engine vs DeepSpeed ZeRO 1/2/3, same model, same batches, 2 ranks.

Each configuration builds the n=4 model and its engine and runs a few training steps; the figure is the
rank's peak memory over that, above what the process held before building the model (imports, data):
parameters, gradients, optimizer state, activations and temporaries. ZeRO-3 runs the naive loss
(mtp.memory_efficient=false; see mtp_pretrain/engine/deepspeed.py), so its activations include all n
heads' logits. Method (memory.PeakMemory): on GPUs torch.cuda.max_memory_allocated; on CPU the Linux RSS
high-water mark reset before each configuration (/proc/self/clear_refs) with glibc's mmap threshold pinned
low so freed tensors leave RSS (as tools/bench_loss_memory.py). Ratios to the megatron engine are measured
in one run.

    python tools/bench_engines.py [--world-size 2 --hidden 512 --trunk-layers 2 --vocab 32768 --seq 128
                                   --batch 2]
"""

from __future__ import annotations

import argparse
import gc

import torch

from mtp_pretrain import parallel
from mtp_pretrain.bench.memory import PeakMemory
from mtp_pretrain.bench.models import bench_model, random_step, shape_config
from mtp_pretrain.bench.options import add_shape_args, bench_parser, write_json
from mtp_pretrain.bench.process import distributed_world, pin_mmap_threshold, relaunch_under_torchrun
from mtp_pretrain.flops import model_params

N = 4
CONFIGS = ["megatron", "zero1", "zero2", "zero3"]


def _measure(name: str, args: argparse.Namespace) -> float:
    """MiB of this rank's peak over building ``name``'s model + engine and its training steps."""
    from megatron.core import parallel_state

    from mtp_pretrain.config import OptimConfig, ParallelConfig
    from mtp_pretrain.engine.deepspeed import DeepSpeedEngine
    from mtp_pretrain.engine.megatron import MegatronEngine

    with PeakMemory() as mem:
        _, _, tconf, model = bench_model(args, N, memory_efficient=name != "zero3")
        optim = OptimConfig(warmup_steps=1)
        if name == "megatron":
            engine = MegatronEngine(model, tconf, optim, 100)
        else:
            zero = ParallelConfig(engine="deepspeed", zero_stage=int(name[-1]))
            engine = DeepSpeedEngine(model, optim, 100, zero, args.batch, 1)
        g = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
        for _ in range(args.steps):
            random_step(engine, args, args.seq + N, generator=g)
    del engine, model
    gc.collect()
    return mem.added / 2**20


def print_table(rows: dict[str, list[float]], args: argparse.Namespace) -> None:
    ref = max(rows["megatron"]) if "megatron" in rows else None
    params = model_params(shape_config(args, args.trunk_layers + N), args.vocab) / 1e6
    print(
        f"\npeak memory per rank above the pre-model baseline, {args.world_size} ranks, n={N}, "
        f"d={args.hidden}, {args.trunk_layers}+{N} layers, V={args.vocab} (~{params:.0f}M params), "
        f"T={args.seq}, B={args.batch}, fp32 AdamW, measured in one run"
    )
    print(
        f"{'engine':<10} "
        + " ".join(f"{'rank ' + str(r):>10}" for r in range(args.world_size))
        + f" {'x megatron':>11}"
    )
    for name, peaks in rows.items():
        ratio = f"{max(peaks) / ref:>11.2f}" if ref else ""
        print(f"{name:<10} " + " ".join(f"{m:>8.0f}Mi" for m in peaks) + f" {ratio}")


def main(argv: list[str] | None = None) -> None:
    pin_mmap_threshold()  # a no-op when the entry point did it already (before torch loaded)
    p = bench_parser(__doc__)
    p.add_argument("--world-size", type=int, default=2)
    add_shape_args(p, hidden=512, heads=8, trunk_layers=2, seq=128, batch=2, vocab=32768)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    args = p.parse_args(argv)
    relaunch_under_torchrun("mtp_pretrain.bench.engines", args.world_size, argv)  # the children go on here

    with distributed_world():
        rows = {}
        for name in args.configs.split(","):
            every = [None] * parallel.world_size()
            torch.distributed.all_gather_object(every, _measure(name, args))
            rows[name] = every
        if parallel.rank() == 0:
            print_table(rows, args)
            if args.json:
                write_json(args.json, {"args": vars(args), "peak_mib": rows})


if __name__ == "__main__":
    main()
