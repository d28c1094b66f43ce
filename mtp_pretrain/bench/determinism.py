"""The cost of ``trainer.deterministic``: training-step time with it on vs off, in one process.

The main job's model by default (conf/experiment/cpu_demo: 2 trunk blocks + n=4 heads, d=128, T=128, B=16,
V=1024). Two identical engines take turns, one step each per round, the order reversed every other round,
so machine noise hits both alike; before each step ``determinism.configure`` switches the setting: torch's
deterministic algorithms (with new tensors' memory filled), cuDNN's flags and MKL's dynamic threading.
MKL's code path (``MKL_CBWR``) is fixed at the process's first MKL call: export ``MKL_CBWR=AUTO`` to time
both engines with it (as a ``mtp-train trainer.deterministic=true`` process runs), leave it unset for without.

    python tools/bench_determinism.py [--steps 10] [--hidden 128 --trunk-layers 2 --n 4 --seq 128 ...]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from mtp_pretrain import compat, determinism
from mtp_pretrain.bench.models import bench_model, random_step
from mtp_pretrain.bench.options import add_shape_args, bench_parser, report
from mtp_pretrain.bench.process import distributed_world
from mtp_pretrain.bench.timing import interleaved
from mtp_pretrain.model.attention import resolve_backend

WARMUP = 2  # untimed rounds first
SETTINGS = {"off": False, "on": True}


def run(args: argparse.Namespace) -> dict:
    from mtp_pretrain.config import OptimConfig
    from mtp_pretrain.engine.megatron import MegatronEngine

    cbwr = os.environ.get("MKL_CBWR")  # as exported: configure(True) sets it, too late for this process
    with distributed_world():
        engines = {}
        for name in SETTINGS:
            _, _, tconf, model = bench_model(args, args.n)
            engines[name] = MegatronEngine(model, tconf, OptimConfig(), 1000)

        batches = {name: torch.Generator().manual_seed(0) for name in SETTINGS}  # the same for both

        def step(name: str):  # noqa: ANN202 (a StepResult)
            determinism.configure(SETTINGS[name])
            return random_step(engines[name], args, args.seq + args.n, generator=batches[name])

        try:
            times, results = interleaved(
                {name: (lambda name=name: step(name)) for name in SETTINGS},
                WARMUP,
                args.steps,
                alternate=True,
            )
        finally:
            determinism.configure(False)
    step_s = {name: statistics.median(ts) for name, ts in times.items()}
    losses = {name: [r.loss for r in rs] for name, rs in results.items()}
    result = {
        "step_s": step_s,
        "tokens_per_s": {name: args.batch * args.seq / s for name, s in step_s.items()},
        "slowdown": step_s["on"] / step_s["off"],  # > 1: deterministic is slower
        "same_losses": losses["on"] == losses["off"],  # on this device: whether the kernels differ at all
        "threads": torch.get_num_threads(),
        "mkl_cbwr": cbwr,
        "attention": resolve_backend(args.attention),
        "device": compat.device().type,
    }
    return report(result, lambda r: print_table(r, args), args.json)


def print_table(result: dict, args: argparse.Namespace) -> None:
    print(
        f"\ntrainer.deterministic: step time off vs on ({args.trunk_layers} trunk blocks + n={args.n}, "
        f"d={args.hidden}, T={args.seq}, B={args.batch}, V={args.vocab}, {result['threads']} threads, "
        f"MKL_CBWR={result['mkl_cbwr'] or 'unset'}, {result['device']})"
    )
    print(f"{'':>4} {'step s':>9} {'tokens/s':>10}")
    for name in SETTINGS:
        print(f"{name:>4} {result['step_s'][name]:>9.3f} {result['tokens_per_s'][name]:>10.0f}")
    print(f"on / off: {result['slowdown']:.3f}x step time; same losses: {result['same_losses']}")


def main(argv: list[str] | None = None) -> dict:
    p = bench_parser(__doc__)
    add_shape_args(p, hidden=128, heads=4, trunk_layers=2, seq=128, batch=16, vocab=1024)
    p.add_argument("--n", type=int, default=4, help="MTP heads")
    p.add_argument("--steps", type=int, default=10, help=f"timed rounds (after {WARMUP} warm-up rounds)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
