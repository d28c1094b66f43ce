"""Peak memory of one training step's loss + backward: naive MTP vs memory-efficient vs chunked.

Same trunk for every row (its layer count is fixed; n head blocks are added on top), one process.

Method (memory.PeakMemory). On a GPU: torch.cuda.reset_peak_memory_stats / max_memory_allocated around the
step. On CPU: Linux's resident-set high-water mark (VmHWM), reset right before the step by writing "5" to
/proc/self/clear_refs; the figure is VmHWM after the step minus VmRSS before it. glibc's mmap threshold is
pinned low (MALLOC_MMAP_THRESHOLD_, set before torch loads) so every tensor above 64 KiB is an mmap that
is returned to the OS when freed, making RSS follow live tensor bytes. Parameter .grad buffers are
allocated by a warm-up step first, so the figure is the step's activations and temporaries.

    python tools/bench_loss_memory.py [--vocab 32768 --seq 512 --batch 4 --hidden 256]
"""

from __future__ import annotations

import argparse
import gc

import torch

from mtp_pretrain import compat
from mtp_pretrain.bench.memory import PeakMemory
from mtp_pretrain.bench.models import bench_model
from mtp_pretrain.bench.options import add_shape_args, bench_parser, write_json
from mtp_pretrain.bench.process import distributed_world, pin_mmap_threshold
from mtp_pretrain.model.attention import resolve_backend


def measure_step_peak(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of peak memory one forward+backward adds on top of what is alive before it."""
    with PeakMemory() as mem:
        loss, _ = model(tokens)
        loss.backward()
        del loss
    return mem.added


def run(args: argparse.Namespace) -> list[dict]:
    modes = {
        "naive": dict(memory_efficient=False),
        "efficient": dict(memory_efficient=True),
        f"chunked({args.chunk})": dict(memory_efficient=True, chunk_size=args.chunk),
    }
    dev = compat.device()
    rows = []
    for n in args.n:
        for mode, kw in modes.items():
            torch.manual_seed(0)
            _, _, _, model = bench_model(args, n, **kw)
            tokens = torch.randint(0, args.vocab, (args.batch, args.seq + n), device=dev)
            model(tokens)[0].backward()  # warm-up: allocates every .grad
            peak = min(measure_step_peak(model, tokens) for _ in range(args.repeat))
            rows.append({"n": n, "mode": mode, "peak_bytes": peak})
            del model, tokens
            gc.collect()
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    ref_n = min(r["n"] for r in rows)  # n=1 when measured (the default); else the smallest n run
    ref = next(r["peak_bytes"] for r in rows if r["n"] == ref_n and r["mode"] == "efficient")
    logits = args.seq * args.batch * args.vocab * 4
    print(
        f"\nloss-step peak memory (V={args.vocab}, T={args.seq}, B={args.batch}, d={args.hidden}, "
        f"trunk {args.trunk_layers} layers, attention {resolve_backend(args.attention)}; one head's fp32 logits = "
        f"{logits / 2**20:.0f} MiB)"
    )
    print(f"{'n':>3} {'mode':<14} {'peak MiB':>10} {f'x efficient n={ref_n}':>16} {'x naive same n':>15}")
    for r in rows:
        naive = next(q["peak_bytes"] for q in rows if q["n"] == r["n"] and q["mode"] == "naive")
        print(
            f"{r['n']:>3} {r['mode']:<14} {r['peak_bytes'] / 2**20:>10.1f} {r['peak_bytes'] / ref:>16.2f} "
            f"{r['peak_bytes'] / naive:>15.2f}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    pin_mmap_threshold()  # a no-op when the entry point did it already (before torch loaded)
    p = bench_parser(__doc__)
    add_shape_args(p, hidden=256, heads=4, trunk_layers=2, seq=512, batch=4, vocab=32768)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--n", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeat", type=int, default=2, help="measurements per row; the minimum is kept")
    args = p.parse_args(argv)
    with distributed_world():
        rows = run(args)
    print_table(rows, args)
    if args.json:
        shape = {
            k: getattr(args, k) for k in ("vocab", "seq", "batch", "hidden", "heads", "trunk_layers", "chunk")
        }
        write_json(args.json, {"shape": shape, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
