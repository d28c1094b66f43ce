"""Training-step time of n=1 vs n=4 on the same trunk, next to the FLOP ratio from the model shape.

Same trunk (its layer count fixed), n head blocks on top; one process (or `--world-size N` via torchrun for a
parallel layout: pass the usual `--tp/--pp`). Step times are the median of timed steps after warm-up,
n=1 and n=4 interleaved so machine noise hits both alike. Prints the ratio (time n=4 / time n=1) divided by
the FLOP ratio: 1.0 means the extra heads cost exactly their FLOPs; the target is <= 1.05.

    python tools/bench_step.py [--hidden 256 --trunk-layers 4 --seq 256 --batch 8 --vocab 8192 --steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchlib import add_shape_args, bench_model, random_step


def _engine(n: int, args: argparse.Namespace):
    from mtp_pretrain.config import OptimConfig
    from mtp_pretrain.engine.megatron import MegatronEngine

    cfg, _, tconf, model = bench_model(args, n, bf16=args.bf16, chunk_size=args.chunk)
    return cfg, MegatronEngine(model, tconf, OptimConfig(), 1000, bf16=args.bf16)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, hidden=256, heads=4, trunk_layers=4, seq=256, batch=8, vocab=8192)
    p.add_argument("--chunk", type=int, default=0)
    p.add_argument("--steps", type=int, default=6, help="timed steps per n (after 2 warm-up steps)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--world-size", type=int, default=1, help="re-launch under torchrun with this many processes")
    p.add_argument("--json", help="also write the numbers here (rank 0)")
    args = p.parse_args(argv)
    if args.world_size > 1 and "RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.world_size}",
               __file__, *(argv or sys.argv[1:])]  # fmt: skip  (the children see RANK and do not relaunch)
        sys.exit(subprocess.call(cmd))

    from mtp_pretrain import parallel
    from mtp_pretrain.flops import train_flops_per_token

    layout = parallel.init_distributed(tp=args.tp, pp=args.pp)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    setups = {n: _engine(n, args) for n in (1, 4)}
    times: dict[int, list[float]] = {1: [], 4: []}
    for i in range(args.steps + 2):
        for n, (_cfg, engine) in setups.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            random_step(engine, args, args.seq + n)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= 2:
                times[n].append(time.perf_counter() - t0)
    step = {n: statistics.median(ts) for n, ts in times.items()}
    flops = {n: train_flops_per_token(cfg, n, args.vocab) for n, (cfg, _) in setups.items()}
    tokens_per_step = args.batch * args.seq * layout.dp
    result = {
        "step_s": step, "tokens_per_s": {n: tokens_per_step / s for n, s in step.items()},
        "time_ratio": step[4] / step[1], "flop_ratio": flops[4] / flops[1],
    }  # fmt: skip
    result["time_over_flops"] = result["time_ratio"] / result["flop_ratio"]
    if parallel.rank() == 0:
        print(f"\nstep time, same trunk ({args.trunk_layers} layers, d={args.hidden}, T={args.seq}, B={args.batch}, "
              f"V={args.vocab}, tp={args.tp} pp={args.pp} dp={layout.dp}, {dev})")  # fmt: skip
        print(f"{'n':>3} {'step s':>9} {'tokens/s':>10} {'GFLOP/token':>12}")
        for n in (1, 4):
            print(f"{n:>3} {step[n]:>9.3f} {result['tokens_per_s'][n]:>10.0f} {flops[n] / 1e9:>12.4f}")
        print(f"time ratio n4/n1 {result['time_ratio']:.3f} | FLOP ratio {result['flop_ratio']:.3f} | "
              f"time/FLOP ratio {result['time_over_flops']:.3f} (target <= 1.05)")  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    parallel.destroy_distributed()
    return result


if __name__ == "__main__":
    main()
