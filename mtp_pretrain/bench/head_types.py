"""The MTP head designs (mtp.head_type) on one shape: peak memory and step time of a training step, each
over the parallel heads'.

Every model: MTPModel with a trunk of K layers and n heads of one type (model/heads.py: parallel, linear,
causal, anticausal, sequential), every prediction weighing 1, fp32, no parallelism, the core attention of
the megatron comparison (megatron_mtp.ATTENTION: model.attention=local), built as `mtp-train` builds it
(bench/models.py) and trained by the project's MegatronEngine on one fixed batch (OptimConfig defaults
without the LR warm-up, so the few steps move the loss). The chained types (causal, anticausal,
sequential) take the loss's chained path (loss.py: the heads' forward, then a reverse pass re-running each
head's forward, keeping only d-sized tensors per head); parallel and linear the per-head one.

Measured as mtp_pretrain/bench/versus.py says (the megatron comparison's method): the peak memory of one
whole training step (forward, backward, optimizer step, over what lives between steps: parameters,
gradient buffers, optimizer state) in a fresh subprocess per type, on CPU the resident-set high-water
mark with glibc's mmap threshold pinned (memory.PeakMemory), on a GPU max_memory_allocated; and the
median step time of every type in this one process, the types' steps interleaved (alternating the order)
so machine noise hits all alike. Ratios are each type's over parallel's (memory_ratio, time_ratio).

    python tools/bench_head_types.py [--hidden 256 --heads 4 --trunk-layers 2 --n 4 --seq 256 --batch 4
                                      --vocab 32768 --types parallel,causal --steps 3 --json out.json]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mtp_pretrain import compat
from mtp_pretrain.bench.megatron_mtp import ATTENTION
from mtp_pretrain.bench.models import bench_model
from mtp_pretrain.bench.options import add_shape_args, bench_parser, report
from mtp_pretrain.bench.versus import Builder, add_run_args, memory_child, optim, run_models

HEAD_TYPES = ("parallel", "linear", "causal", "anticausal", "sequential")
REFERENCE = "parallel"  # every ratio is over this type's figure


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_shape_args(p, hidden=256, heads=4, trunk_layers=2, seq=256, batch=4, vocab=32768)
    p.add_argument("--n", type=int, default=4, help="heads (predictions t+1 .. t+n)")
    p.add_argument(
        "--types",
        default=",".join(HEAD_TYPES),
        help=f"comma-separated head types to compare ({REFERENCE}, the reference, always runs)",
    )
    add_run_args(p, HEAD_TYPES)
    p.set_defaults(attention=ATTENTION)  # read by bench_model's shape_config: our model.attention
    args = p.parse_args(argv)
    types = [t for t in args.types.split(",") if t]
    unknown = set(types) - set(HEAD_TYPES)
    if unknown:
        p.error(f"unknown head type(s) {sorted(unknown)}; choose from {','.join(HEAD_TYPES)}")
    args.types = [t for t in HEAD_TYPES if t == REFERENCE or t in types]  # the reference first
    return args


def builder(head_type: str) -> Builder:
    """The model of one head type in a MegatronEngine: (engine, sample length T + n)."""

    def build(args: argparse.Namespace) -> tuple[Any, int]:
        from mtp_pretrain.engine.megatron import MegatronEngine

        _, _, tconf, model = bench_model(args, args.n, loss_weights=[1.0] * args.n, head_type=head_type)
        return MegatronEngine(model, tconf, optim(), 1000), args.seq + args.n

    return build


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    builders = {t: builder(t) for t in args.types}
    models = run_models("mtp_pretrain.bench.head_types", argv, builders, args, args.seq + args.n)
    ref = models[REFERENCE]
    rows = [
        {
            "head_type": t,
            **m,
            "memory_ratio": m["peak_mib"] / ref["peak_mib"],
            "time_ratio": m["step_s"] / ref["step_s"],
        }
        for t, m in models.items()
    ]
    config = {k: getattr(args, k) for k in ("hidden", "heads", "trunk_layers", "n", "seq", "batch", "vocab")}
    config |= {
        "steps": args.steps,
        "warmup": args.warmup,
        "device": compat.device().type,
        "attention": ATTENTION,
        "reference": REFERENCE,
    }
    return {"config": config, "rows": rows}


def print_table(r: dict) -> None:
    c = r["config"]
    print(
        f"\nMTP head types: trunk {c['trunk_layers']} + {c['n']} heads (d={c['hidden']}, {c['heads']} heads, "
        f"T={c['seq']}, B={c['batch']}, V={c['vocab']}, fp32, attention: {c['attention']}, {c['device']}; "
        f"{c['steps']} timed steps after {c['warmup']} warm-up, interleaved)"
    )
    rss = all("rss_peak_mib" in row for row in r["rows"])
    rss_column = f" {'RSS peak MiB':>13}" if rss else ""
    print(
        f"{'head type':<11} {'params':>11} {'step s':>8} {'x parallel':>10} {'step peak MiB':>14} "
        f"{'x parallel':>10}{rss_column}  {'loss first -> last':<19} {'falls':>5}"
    )
    for row in r["rows"]:
        line = (
            f"{row['head_type']:<11} {row['params']:>11,} {row['step_s']:>8.3f} {row['time_ratio']:>10.2f} "
            f"{row['peak_mib']:>14.1f} {row['memory_ratio']:>10.2f}"
        )
        if rss:
            line += f" {row['rss_peak_mib']:>13.1f}"
        line += f"  {row['loss_first']:>7.4f} -> {row['loss_last']:<7.4f}"
        print(line + f" {'yes' if row['loss_decreased'] else 'NO':>5}")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(builder(args.memory_child), args, args.seq + args.n)
    return report(run(args, argv), print_table, args.json)


if __name__ == "__main__":
    main()
