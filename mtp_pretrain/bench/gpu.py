"""GPU throughput of the 1B model (conf/model/1b.yaml) in bf16: n=1 vs n=4 at the same total layer count,
and n=1 with each attention kernel (`model.attention=sdpa` vs `=local`) at T=2048.

Both runs keep L = 16 blocks (trunk L-n + n heads, the paper's fair comparison) and train on random tokens
through the project's own pieces: `parallel.init_distributed`, `build_model` + `transformer_config`,
`MegatronEngine.train_step` (the path `mtp-train` takes), FLOPs from `mtp_pretrain.flops`. Per n it
reports the median step time, tokens/s, MFU and peak `torch.cuda.max_memory_allocated` (reset between the
runs), then the n=4/n=1 time ratio next to the FLOP ratio and the n=4/n=1 peak-memory ratio. The two
attention rows time the same n=1 model with torch's fused scaled_dot_product_attention and with megatron's
unfused attention (the score matrix materialized); a version without the `model.attention` key reports
them as unavailable instead of failing.

Target: >= 45% MFU for n=1 on one H200 (peak 989 TFLOP/s dense bf16). The default run (micro-batch 4 x
seq 2048, vocab 32768, 3 warm-up + 20 timed steps per n) takes well under 5 minutes there.

On a GPU machine (the venv needs a CUDA build of torch: see tools/bootstrap.sh and the README):

    TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ make venv     # the index of your CUDA version
    bash tools/bench_gpu.sh                                   # the 1B benchmark
    bash tools/bench_gpu.sh --micro-batch 8 --recompute --json bench.json

Without CUDA (or with --dry-run) it runs a dry mode: the tiny model (conf/model/tiny.yaml: 6 layers,
d=128, seq 128) with vocab 1024 in fp32 for a few steps, through exactly the same code, printing the same
table (peak memory n/a on CPU). Its numbers only show that the script works.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from mtp_pretrain import compat
from mtp_pretrain.bench.memory import PeakMemory
from mtp_pretrain.bench.models import build_on_device, train_on
from mtp_pretrain.bench.options import bench_parser, write_json
from mtp_pretrain.bench.process import distributed_world
from mtp_pretrain.bench.timing import format_time_over_flops, time_over_flops, timed
from mtp_pretrain.config import Config, compose_train_config
from mtp_pretrain.flops import mfu, peak_flops, train_flops_per_token

GPU = dict(preset="1b", micro_batch=4, seq=None, vocab=32768, steps=20, warmup=3, attention_seq=2048)
DRY = dict(preset="tiny", micro_batch=2, seq=None, vocab=1024, steps=2, warmup=2, attention_seq=None)
HEADS = (1, 4)
ATTENTION = ("sdpa", "local")  # model.attention of the n=1 rows that compare the attention kernels


@dataclass
class Row:
    n: int
    step_s: float
    tokens_per_s: float
    mfu: float  # a fraction of the device's peak (0.45 = 45%)
    peak_gib: float | None  # torch.cuda.max_memory_allocated; None without CUDA
    flops_per_token: float
    step_times_s: list[float]
    attention: str = "auto"  # model.attention of the run
    seq: int = 0  # T, input positions per sample


def compose(preset: str, n: int, seq: int | None, attention: str | None = None) -> Config:
    """The real Hydra config (conf/train.yaml) with `model=<preset> mtp.n=<n>`, as `mtp-train` builds it."""
    overrides = [f"model={preset}", f"mtp.n={n}"] + ([f"model.seq_len={seq}"] if seq else [])
    return compose_train_config(overrides + ([f"model.attention={attention}"] if attention else []))


def bench_one(cfg: Config, args: argparse.Namespace, peak: float) -> Row:
    """Build the n-head model and its engine, train `warmup + steps` steps on random tokens, time them."""
    from mtp_pretrain.config import OptimConfig
    from mtp_pretrain.engine.megatron import MegatronEngine
    from mtp_pretrain.model.mtp_model import transformer_config

    n, seq, mb = cfg.mtp.n, cfg.model.seq_len, args.micro_batch
    dev = compat.device()
    with PeakMemory() as mem:
        tconf = transformer_config(cfg.model, cfg.mtp, tp=1, pp=1, bf16=args.bf16, recompute=args.recompute)
        model = build_on_device(cfg.model, cfg.mtp, args.vocab, tconf)
        total_steps = args.warmup + args.steps
        engine = MegatronEngine(model, tconf, OptimConfig(), total_steps, bf16=args.bf16)
        gen = torch.Generator(device=dev).manual_seed(n)
        times = []
        for i in range(total_steps):
            tokens = torch.randint(0, args.vocab, (mb, seq + n), device=dev, generator=gen)
            result, seconds = timed(partial(train_on, engine, tokens, seq, mb))
            if i >= args.warmup:
                times.append(seconds)
            if result.nonfinite:
                raise RuntimeError(f"n={n}: non-finite loss at step {i}")
    del engine, model, tconf, result
    step = statistics.median(times)
    tokens_per_s = mb * seq / step
    flops = train_flops_per_token(cfg.model, n, args.vocab)
    peak_gib = mem.peak / 2**30 if torch.cuda.is_available() else None  # the CPU figure is not this one
    attention = getattr(cfg.model, "attention", "auto")
    mfu_ = mfu(tokens_per_s, flops, peak)
    return Row(n, step, tokens_per_s, mfu_, peak_gib, flops, times, attention, seq)


def bench_attention(args: argparse.Namespace, peak: float) -> tuple[list[Row], str | None]:
    """The n=1 rows at T=``args.attention_seq``, one per kernel of ATTENTION; (rows, why some are missing).

    Optional rows: a version without the `model.attention` key, or a kernel that fails here (out of memory,
    say), gives a message instead of losing the n=1/n=4 rows measured before."""
    rows = []
    for backend in ATTENTION:
        try:
            cfg = compose(args.preset, 1, args.attention_seq, backend)
        except Exception as e:  # Hydra's "Key 'attention' is not in struct" before the key exists
            return rows, f"model.attention={backend} is not available in this version ({_first_line(e)})"
        try:
            rows.append(bench_one(cfg, args, peak))
        except Exception as e:
            return rows, f"model.attention={backend} failed: {type(e).__name__}: {_first_line(e)}"
        print(f"  n=1 attention={backend} done: median step {rows[-1].step_s:.4f} s", flush=True)
    return rows, None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def format_table(rows: list[Row]) -> str:
    lines = [f"{'run':<20} {'T':>5} {'step s':>9} {'tokens/s':>11} {'MFU %':>7} {'peak GiB':>9}"]
    for r in rows:
        mem = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "n/a"
        run = f"n={r.n} attention={r.attention}" if r.attention != "auto" else f"n={r.n}"
        lines.append(
            f"{run:<20} {r.seq:>5} {r.step_s:>9.4f} {r.tokens_per_s:>11.0f} {100 * r.mfu:>7.2f} {mem:>9}"
        )
    return "\n".join(lines)


def ratios_of(rows: list[Row], attention_rows: list[Row]) -> dict[str, float | None]:
    """n=4 over n=1 (step time, FLOPs, peak memory) and sdpa over local step time (None where not run)."""
    by_n = {r.n: r for r in rows}
    ratios: dict[str, float | None] = dict(
        time_over_flops(
            {n: r.step_s for n, r in by_n.items()}, {n: r.flops_per_token for n, r in by_n.items()}
        )
    )
    peaks = (by_n[4].peak_gib, by_n[1].peak_gib)
    ratios["memory_ratio"] = peaks[0] / peaks[1] if None not in peaks else None
    kernels = {r.attention: r.step_s for r in attention_rows}
    ratios["sdpa_over_local"] = kernels["sdpa"] / kernels["local"] if len(kernels) == 2 else None
    return ratios


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument(
        "--steps", type=int, default=None, help=f"timed steps per n (default {GPU['steps']}, dry 2)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help=f"untimed steps per n first (default {GPU['warmup']})"
    )
    p.add_argument(
        "--micro-batch", type=int, default=None, help=f"samples per step (default {GPU['micro_batch']})"
    )
    p.add_argument("--seq", type=int, default=None, help="input positions per sample (default: the preset's)")
    p.add_argument(
        "--vocab", type=int, default=None, help=f"vocabulary size (default {GPU['vocab']}, dry 1024)"
    )
    p.add_argument("--preset", default=None, help="conf/model/<preset>.yaml (default 1b, dry tiny)")
    p.add_argument("--recompute", action="store_true", help="full activation recompute of the trunk layers")
    p.add_argument(
        "--attention-seq",
        type=int,
        default=None,
        help=f"T of the sdpa/local rows (default {GPU['attention_seq']}, dry: the preset's)",
    )
    p.add_argument(
        "--no-attention", dest="attention", action="store_false", help="skip the sdpa vs local rows"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="tiny model in fp32: shows the script works (CPU ok)"
    )
    args = p.parse_args(argv)
    args.no_cuda = not torch.cuda.is_available()
    args.dry_run = args.dry_run or args.no_cuda
    defaults = DRY if args.dry_run else GPU
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.bf16 = not args.dry_run  # bf16 on CPU is slow and not what the dry run checks
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.processor()}".strip()
    )
    print(f"device: {device} | torch {torch.__version__} | CUDA {torch.version.cuda or 'none'}")
    if args.dry_run:
        why = "no CUDA device found" if args.no_cuda else "--dry-run"
        print(
            f"DRY RUN ({why}): model={args.preset}, vocab {args.vocab}, fp32, {args.steps} timed steps; "
            "the numbers only show that the benchmark works, not GPU throughput"
        )
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = peak_flops(dtype)
    with distributed_world(tp=1, pp=1):
        cfgs = {n: compose(args.preset, n, args.seq) for n in HEADS}
        m = cfgs[1].model
        print(
            f"model {m.preset}: L={m.num_layers} (trunk L-n + n heads), d={m.hidden_size}, "
            f"heads {m.num_attention_heads}/{m.num_query_groups or m.num_attention_heads} groups, "
            f"T={m.seq_len}, B={args.micro_batch}, V={args.vocab}, {str(dtype).removeprefix('torch.')}, "
            f"recompute={args.recompute}, {args.warmup} warm-up + {args.steps} timed steps, "
            f"peak {peak / 1e12:.3g} TFLOP/s"
        )
        rows = []
        for n in HEADS:
            rows.append(bench_one(cfgs[n], args, peak))
            print(f"  n={n} done: median step {rows[-1].step_s:.4f} s", flush=True)
        attention_rows, attention_note = (
            bench_attention(args, peak) if args.attention else ([], "--no-attention")
        )
    by_n = {r.n: r for r in rows}
    ratios = ratios_of(rows, attention_rows)
    print()
    print(format_table(rows + attention_rows))
    print(format_time_over_flops(ratios))
    memory = ratios["memory_ratio"]
    print(
        f"peak memory ratio n4/n1 {memory:.3f}" if memory is not None else "peak memory ratio n4/n1 n/a (CPU)"
    )
    if ratios["sdpa_over_local"] is not None:
        print(f"step time ratio sdpa/local (n=1) {ratios['sdpa_over_local']:.3f}")
    else:
        print(f"sdpa vs local: not measured: {attention_note}")
    if not args.dry_run:
        print(f"target: n=1 MFU >= 45% on H200 -> {'met' if by_n[1].mfu >= 0.45 else 'NOT met'}")
    result = {
        "device": device,
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "dtype": str(dtype).removeprefix("torch."),
        "model": asdict(m),
        "micro_batch": args.micro_batch,
        "vocab": args.vocab,
        "recompute": args.recompute,
        "warmup": args.warmup,
        "steps": args.steps,
        "peak_flops": peak,
        "rows": [asdict(r) for r in rows],
        "attention_rows": [asdict(r) for r in attention_rows],
        "attention_note": attention_note,
        **ratios,
    }
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
