"""Core attention backends: training-step time and peak memory of model.attention=sdpa vs local at T and 2T.

local is megatron's DotProductAttention: it materialises the [B, heads, T, T] scores and probabilities
(kept for backward, per layer); sdpa is torch's scaled_dot_product_attention (flash / memory-efficient
kernels: no T x T tensor). The same model otherwise (the project's builders, fp32, one process): a trunk of
--trunk-layers blocks + 1 head, trained by MegatronEngine on random tokens.

 - step time: both backends' steps interleaved after a warm-up step (machine noise hits both alike); the
   median of the timed steps.
 - peak memory: mtp_pretrain/bench/memory.py's method (CPU: resident-set high-water mark with glibc's mmap
   threshold pinned; GPU: max_memory_allocated), a training step's peak over what lives between steps.
   megatron keeps local's score buffer between steps (parallel_state's global memory buffer): it is freed
   before the measured step so that the step's T x T scores count, as they do in every step's peak.
Ratios are sdpa / local.

    python tools/bench_attention.py [--hidden 256 --heads 4 --trunk-layers 1 --seq 1024 --batch 2
                                     --vocab 4096 --steps 2 --json out.json]
"""

from __future__ import annotations

import argparse
import statistics

from mtp_pretrain import compat
from mtp_pretrain.bench.memory import PeakMemory
from mtp_pretrain.bench.models import bench_model, random_step
from mtp_pretrain.bench.options import add_shape_args, bench_parser, report
from mtp_pretrain.bench.process import distributed_world, pin_mmap_threshold
from mtp_pretrain.bench.timing import interleaved

BACKENDS = ("sdpa", "local")
N = 1  # one head: the blocks' attention is what differs, not the MTP loss


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_shape_args(p, hidden=256, heads=4, trunk_layers=1, seq=1024, batch=2, vocab=4096)
    p.add_argument("--steps", type=int, default=2, help="timed steps per backend and length (after warm-up)")
    return p.parse_args(argv)


def _engine(args: argparse.Namespace, seq: int, attention: str):  # noqa: ANN202
    from mtp_pretrain.config import OptimConfig
    from mtp_pretrain.engine.megatron import MegatronEngine

    shape = argparse.Namespace(**{**vars(args), "seq": seq, "attention": attention})
    _, _, tconf, model = bench_model(shape, N)
    return shape, MegatronEngine(model, tconf, OptimConfig(), 1000)


def _step_peak(engine, shape: argparse.Namespace) -> int:  # noqa: ANN001
    """One training step's peak bytes over what lives between steps (local's score buffer freed first)."""
    from megatron.core import parallel_state

    parallel_state.get_global_memory_buffer().buffer.clear()
    with PeakMemory() as mem:
        random_step(engine, shape, shape.seq + N)
    return mem.added


def measure(args: argparse.Namespace, seq: int) -> dict:
    """Both backends at sequence length ``seq``: step times, peaks and the sdpa / local ratios."""
    setups = {name: _engine(args, seq, name) for name in BACKENDS}
    steps = {
        name: (lambda s=shape, e=engine: random_step(e, s, seq + N))
        for name, (shape, engine) in setups.items()
    }
    times, _ = interleaved(steps, warmup=1, rounds=args.steps, alternate=True)
    row: dict = {"seq": seq}
    for name, (shape, engine) in setups.items():
        row[f"{name}_step_s"] = statistics.median(times[name])
        row[f"{name}_step_times_s"] = times[name]
        row[f"{name}_peak_mib"] = _step_peak(engine, shape) / 2**20
    row["time_ratio"] = row["sdpa_step_s"] / row["local_step_s"]
    row["memory_ratio"] = row["sdpa_peak_mib"] / row["local_peak_mib"]
    return row


def run(args: argparse.Namespace) -> dict:
    with distributed_world():
        rows = [measure(args, seq) for seq in (args.seq, 2 * args.seq)]
    config = {k: getattr(args, k) for k in ("hidden", "heads", "trunk_layers", "batch", "vocab", "steps")}
    return {"config": config | {"heads_n": N, "device": compat.device().type}, "rows": rows}


def print_table(r: dict) -> None:
    c = r["config"]
    print(
        f"\ncore attention sdpa vs local: trunk {c['trunk_layers']} + {c['heads_n']} head, d={c['hidden']}, "
        f"{c['heads']} heads, B={c['batch']}, V={c['vocab']}, fp32, {c['device']}; median of {c['steps']} "
        "timed steps after 1 warm-up, interleaved"
    )
    print(
        f"{'T':>6} {'sdpa s':>8} {'local s':>8} {'sdpa MiB':>9} {'local MiB':>10} {'time':>6} {'memory':>7}"
    )
    for row in r["rows"]:
        print(
            f"{row['seq']:>6} {row['sdpa_step_s']:>8.3f} {row['local_step_s']:>8.3f} {row['sdpa_peak_mib']:>9.1f} "
            f"{row['local_peak_mib']:>10.1f} {row['time_ratio']:>5.2f}x {row['memory_ratio']:>6.2f}x"
        )
    print("sdpa / local: time and step peak memory ratios above")


def main(argv: list[str] | None = None) -> dict:
    pin_mmap_threshold()  # a no-op when the entry point did it already (before torch loaded)
    args = parse_args(argv)
    return report(run(args), print_table, args.json)


if __name__ == "__main__":
    main()
