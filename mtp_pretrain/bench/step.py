"""Training-step time of n=1 vs n=4 on the same trunk, next to the FLOP ratio from the model shape.

Same trunk (its layer count fixed), n head blocks on top; one process (or `--world-size N` via torchrun for a
parallel layout: pass the usual `--tp/--pp`). Step times are the median of timed steps after warm-up,
n=1 and n=4 interleaved so machine noise hits both alike. Prints the ratio (time n=4 / time n=1) divided by
the FLOP ratio: 1.0 means the extra heads cost exactly their FLOPs; the target is <= 1.05.

    python tools/bench_step.py [--hidden 256 --trunk-layers 4 --seq 256 --batch 8 --vocab 8192 --steps 6]
"""

from __future__ import annotations

import argparse
import statistics

from mtp_pretrain import compat, parallel
from mtp_pretrain.bench.models import bench_model, random_step
from mtp_pretrain.bench.options import add_shape_args, bench_parser, report
from mtp_pretrain.bench.process import distributed_world, relaunch_under_torchrun
from mtp_pretrain.bench.timing import format_time_over_flops, interleaved, time_over_flops
from mtp_pretrain.flops import train_flops_per_token
from mtp_pretrain.model.attention import resolve_backend

HEADS = (1, 4)
WARMUP = 2  # untimed steps per n first


def _engine(n: int, args: argparse.Namespace):  # noqa: ANN202
    from mtp_pretrain.config import OptimConfig
    from mtp_pretrain.engine.megatron import MegatronEngine

    cfg, _, tconf, model = bench_model(args, n, bf16=args.bf16, chunk_size=args.chunk)
    return cfg, MegatronEngine(model, tconf, OptimConfig(), 1000, bf16=args.bf16)


def run(args: argparse.Namespace) -> dict:
    with distributed_world(tp=args.tp, pp=args.pp) as layout:
        setups = {n: _engine(n, args) for n in HEADS}
        steps = {
            n: (lambda n=n, e=engine: random_step(e, args, args.seq + n)) for n, (_, engine) in setups.items()
        }
        times, _ = interleaved(steps, WARMUP, args.steps)
        step = {n: statistics.median(ts) for n, ts in times.items()}
        flops = {n: train_flops_per_token(cfg, n, args.vocab) for n, (cfg, _) in setups.items()}
        tokens_per_step = args.batch * args.seq * layout.dp
        result = {"step_s": step, "tokens_per_s": {n: tokens_per_step / s for n, s in step.items()}}
        result["attention"] = resolve_backend(args.attention)
        result |= time_over_flops(step, flops)
        if parallel.rank() == 0:
            report(result, lambda r: print_table(r, flops, args, layout.dp), args.json)
    return result


def print_table(result: dict, flops: dict[int, float], args: argparse.Namespace, dp: int) -> None:
    dev = compat.device().type
    print(
        f"\nstep time, same trunk ({args.trunk_layers} layers, d={args.hidden}, T={args.seq}, "
        f"B={args.batch}, V={args.vocab}, tp={args.tp} pp={args.pp} dp={dp}, attention {result['attention']}, {dev})"
    )
    print(f"{'n':>3} {'step s':>9} {'tokens/s':>10} {'GFLOP/token':>12}")
    for n in HEADS:
        print(
            f"{n:>3} {result['step_s'][n]:>9.3f} {result['tokens_per_s'][n]:>10.0f} {flops[n] / 1e9:>12.4f}"
        )
    print(format_time_over_flops(result) + " (target <= 1.05)")


def main(argv: list[str] | None = None) -> dict:
    p = bench_parser(__doc__)
    add_shape_args(p, hidden=256, heads=4, trunk_layers=4, seq=256, batch=8, vocab=8192)
    p.add_argument("--chunk", type=int, default=0)
    p.add_argument("--steps", type=int, default=6, help=f"timed steps per n (after {WARMUP} warm-up steps)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--world-size", type=int, default=1, help="re-launch under torchrun with this many processes"
    )
    args = p.parse_args(argv)
    if args.world_size > 1:  # the torchrun children see RANK and go on here
        relaunch_under_torchrun("mtp_pretrain.bench.step", args.world_size, argv)
    return run(args)


if __name__ == "__main__":
    main()
