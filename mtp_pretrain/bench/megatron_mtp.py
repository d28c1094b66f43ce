"""Our MTP vs megatron-core's built-in MTP (DeepSeek-V3 style) on the same trunk: peak memory and step time.

What is compared (no parallelism, fp32, megatron's local layer spec on both sides (ATTENTION: our
model.attention=local, megatron's unfused DotProductAttention), CPU-safe config overrides, the same
hidden size, attention heads, vocabulary, sequence length and batch; each model its own initialisation):
 - ours: MTPModel with a trunk of K layers and n=4 heads (head 1 is the next-token head), each head one
   transformer layer on the trunk output, shared final norm and unembedding, the memory-efficient loss
   (one head's logits alive at a time). K + 4 transformer layers.
 - megatron: GPTModel(num_layers=K + 1, mtp_num_layers=3, mtp_block_spec=get_gpt_mtp_block_spec(...)):
   the trunk plus one layer, so its next-token path is as deep as our head 1, and 3 MTP layers (each
   enorm/hnorm + eh_proj [2d -> d] + one transformer layer + its own final norm), chained: depth k reads
   depth k-1's output and the embedding of the input shifted by k. Also K + 4 transformer layers.
   Its MTP losses are weighted like ours (mtp_loss_scaling_factor = 3, so each depth's mean CE has
   weight 1, as every one of our heads).
Both predict tokens t+1..t+4 at each of T positions (megatron's depth k masks its last k positions).

How. Both models are trained by the same engine, mtp_pretrain.engine.megatron.MegatronEngine (megatron
DDP + DistributedOptimizer + megatron's forward/backward schedule), with the same optimizer settings
(OptimConfig defaults, but no LR warm-up so the few steps move the loss). Megatron's GPTModel is wrapped
in a thin adapter whose forward takes our batch (tokens, target validity) and returns what the engine's
loss function expects, (loss, stats): the next-token loss GPTModel returns, averaged over valid
targets, and each depth's mean loss from megatron's MTPLossLoggingHelper. The MTP losses reach the
gradients the way megatron does it: MTPLossAutoScaler adds their gradient in backward, scaled by the
schedule (grad_scale_func / micro-batches), which the engine's schedule sets as in megatron's training.
Each model trains on one fixed batch (the same tokens for both); its loss must fall over the steps.

 - step time: both models in this process, warm-up steps first, then the timed steps interleaved
   (alternating which model goes first) so machine noise hits both alike; the median is reported.
 - peak memory: one fresh subprocess per model, with the loss-memory benchmark's method
   (mtp_pretrain/bench/memory.py): on CPU the resident-set high-water mark, reset right before a step,
   minus the resident set before it (glibc's mmap threshold pinned low so freed tensors leave the RSS);
   on a GPU, max_memory_allocated. The figure is the training step's peak on top of what lives between
   steps (parameters, gradient buffers, optimizer state: allocated by a warm-up step first); the minimum
   over the measured steps is kept. The process's whole resident peak (libraries + model + state +
   step) is reported too (CPU only).
Ratios are megatron / ours.

    python tools/bench_megatron_mtp.py [--hidden 256 --heads 4 --trunk-layers 2 --seq 256 --batch 4
                                        --vocab 32768 --steps 3 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

import torch

from mtp_pretrain import compat
from mtp_pretrain.bench.memory import PeakMemory
from mtp_pretrain.bench.models import bench_model, on_device, shape_config, train_on
from mtp_pretrain.bench.options import add_shape_args, bench_parser, report
from mtp_pretrain.bench.process import MMAP_THRESHOLD, distributed_world
from mtp_pretrain.bench.timing import interleaved
from mtp_pretrain.processes import child_env
from mtp_pretrain.targets import HeadStats

MODELS = ("ours", "megatron")
# both models' core attention (model/attention.py): the same kernel on both sides, so that only the MTP
# designs differ; megatron's unfused DotProductAttention, as this comparison always ran
ATTENTION = "local"
N_PREDICTIONS = 4  # ours: n=4 heads; megatron: next-token + mtp_num_layers=3
_MEMORY_MARK = "MEMORY_JSON "


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_shape_args(
        p, hidden=256, heads=4, trunk_layers=2, seq=256, batch=4, vocab=32768
    )  # megatron: K+1 layers
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    p.add_argument("--memory-steps", type=int, default=1, help="measured steps per memory subprocess")
    p.add_argument("--memory-child", choices=MODELS, default=None, help=argparse.SUPPRESS)  # internal
    p.set_defaults(attention=ATTENTION)  # read by bench_model's shape_config: our model.attention
    return p.parse_args(argv)


# -- the two models, each in a MegatronEngine -------------------------------------------------------------


class MegatronMTPAdapter(torch.nn.Module):
    """megatron's GPTModel (with its MTP block) behind MTPModel's interface, for MegatronEngine.

    forward(tokens [B, T+1], valid [B, T+1]) -> (next-token loss, HeadStats of the 1 + D predictions: each
    one's mean loss as its loss sum over a count of 1).
    The wrapped model is the attribute ``module``: megatron's schedule and finalize_model_grads find
    GPTModel's attributes (decoder, mtp, set_input_tensor, share_embeddings_and_output_weights ...)
    through DDP by following ``.module`` (get_attr_wrapped_model).
    """

    def __init__(self, gpt: torch.nn.Module) -> None:
        super().__init__()
        self.module = gpt

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, HeadStats]:
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        ids, labels, mask = tokens[:, :-1], tokens[:, 1:], valid[:, 1:].float()
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        tracker = MTPLossLoggingHelper.tracker  # each depth's mean loss, added up by every forward
        if "values" in tracker:
            tracker["values"].zero_()
        # [B, T] per-token next-token CE; the MTP losses ride along in the graph (MTPLossAutoScaler)
        per_token = self.module(ids, positions, None, labels=labels, loss_mask=mask)
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        means = torch.cat([loss.detach().view(1), tracker["values"].detach().clone()])
        return loss, HeadStats(means, torch.zeros_like(means), torch.ones_like(means))


def _optim() -> Any:
    from mtp_pretrain.config import OptimConfig

    return OptimConfig(warmup_steps=0)  # the project's defaults, without the LR ramp from 0


def build_ours(args: argparse.Namespace) -> tuple[Any, int]:
    """(MegatronEngine over MTPModel with a K-layer trunk and 4 heads, sample length T + 4)."""
    from mtp_pretrain.engine.megatron import MegatronEngine

    # every prediction weighs 1
    _, _, tconf, model = bench_model(args, N_PREDICTIONS, loss_weights=[1.0] * N_PREDICTIONS)
    return MegatronEngine(model, tconf, _optim(), 1000), args.seq + N_PREDICTIONS


def build_megatron(args: argparse.Namespace) -> tuple[Any, int]:
    """(MegatronEngine over GPTModel with K+1 decoder layers and mtp_num_layers=3, sample length T + 1).

    Trained by our MegatronEngine, not a plain loop: the engine is megatron's own DDP + distributed
    optimizer + forward/backward schedule, so both models get the identical training path, and the
    schedule is what sets MTPLossAutoScaler's backward scale (a plain loop would have to copy that).
    The adapter is all it takes. On CPU megatron's MTP needs one shim, which compat.apply() (run by
    init_distributed) already provides: MTPLossLoggingHelper.save_loss_to_tracker allocates with
    ``device=torch.cuda.current_device()`` (multi_token_prediction.py), which asserts "Torch not
    compiled with CUDA enabled" on a CPU build; compat answers 0 and maps that device to the CPU.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    from mtp_pretrain.config import MTPConfig
    from mtp_pretrain.engine.megatron import MegatronEngine
    from mtp_pretrain.model.attention import layer_spec
    from mtp_pretrain.model.mtp_model import transformer_config
    from mtp_pretrain.model.vocab import padded_vocab_size

    depth = N_PREDICTIONS - 1
    # our trunk's config (Llama block, fp32, cpu_safe_config_overrides), all K+1 layers in the decoder
    tconf = transformer_config(shape_config(args, args.trunk_layers + 1), MTPConfig(n=1))
    tconf.num_layers = args.trunk_layers + 1
    tconf.mtp_num_layers = depth
    tconf.mtp_loss_scaling_factor = float(depth)  # per-depth weight factor / depth = 1, as our heads
    spec = layer_spec(ATTENTION)  # the block ours is built of
    gpt = GPTModel(
        tconf,
        spec,
        vocab_size=padded_vocab_size(args.vocab, 1),
        max_sequence_length=args.seq,
        position_embedding_type="rope",
        mtp_block_spec=get_gpt_mtp_block_spec(tconf, spec, use_transformer_engine=False),
    )
    return MegatronEngine(MegatronMTPAdapter(on_device(gpt)), tconf, _optim(), 1000), args.seq + 1


BUILDERS = {"ours": build_ours, "megatron": build_megatron}


def _fixed_tokens(args: argparse.Namespace) -> torch.Tensor:
    """The one batch both models train on: [B, T + 4] (megatron takes the first T + 1 of each row)."""
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + N_PREDICTIONS), generator=gen)
    return tokens.to(compat.device())


def per_prediction_losses(result: Any) -> list[float]:
    """Mean CE of each of the 4 predictions (t+1 .. t+4) of one step (either model's HeadStats)."""
    stats = result.head_stats
    return (stats.loss_sum.detach().double() / stats.count.detach().double().clamp(min=1)).cpu().tolist()


def _param_count(engine: Any) -> int:
    return sum(p.numel() for p in engine.module.parameters())


# -- peak memory: one fresh process per model --------------------------------------------------------------


def memory_child(args: argparse.Namespace) -> dict:
    """Build one model, warm it up, measure its training step's peak; runs in its own process."""
    with distributed_world():
        engine, sample_len = BUILDERS[args.memory_child](args)
        tokens = _fixed_tokens(args)[:, :sample_len]
        train_on(engine, tokens, args.seq, args.batch)  # warm-up: optimizer state
        measured = []
        for _ in range(max(args.memory_steps, 1)):
            with PeakMemory() as mem:
                train_on(engine, tokens, args.seq, args.batch)
            measured.append(mem)
        result = {"peak_bytes": min(m.added for m in measured), "params": _param_count(engine)}
        if not torch.cuda.is_available():
            result["rss_peak_bytes"] = measured[-1].peak  # since the last measured step's reset
    return result


def _start_memory_children(argv: list[str]) -> dict[str, subprocess.Popen]:
    # each child a world of one, with the memory method's allocator setting from its start
    env = child_env(MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    cmd = [sys.executable, "-m", "mtp_pretrain.bench.megatron_mtp", *argv]
    return {
        name: subprocess.Popen(
            [*cmd, "--memory-child", name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name in MODELS
    }


def _collect(children: dict[str, subprocess.Popen]) -> dict[str, dict]:
    out = {}
    for name, proc in children.items():
        stdout, stderr = proc.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith(_MEMORY_MARK)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory run of {name} failed (rc {proc.returncode}):\n{stderr[-4000:]}")
        out[name] = json.loads(lines[-1][len(_MEMORY_MARK) :])
    return out


# -- the run -----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    # Memory first, in two fresh processes; they overlap with this process's imports and model builds
    # (the memory figure does not depend on CPU contention) and are waited for before anything is timed.
    children = _start_memory_children(argv)
    try:
        with distributed_world():
            tokens = _fixed_tokens(args)
            setups = {name: BUILDERS[name](args) for name in MODELS}
            memory = _collect(children)
            steps = {
                name: (lambda e=engine, n=sample_len: train_on(e, tokens[:, :n], args.seq, args.batch))
                for name, (engine, sample_len) in setups.items()
            }
            times, results = interleaved(steps, args.warmup, args.steps, alternate=True)
            losses = {name: [per_prediction_losses(r) for r in rs] for name, rs in results.items()}
    finally:
        for proc in children.values():
            if proc.poll() is None:
                proc.kill()
    out: dict[str, Any] = {
        "config": {
            "hidden": args.hidden,
            "heads": args.heads,
            "trunk_layers": args.trunk_layers,
            "seq": args.seq,
            "batch": args.batch,
            "vocab": args.vocab,
            "steps": args.steps,
            "warmup": args.warmup,
            "device": compat.device().type,
            "attention": ATTENTION,
            "ours": f"MTPModel trunk {args.trunk_layers} + {N_PREDICTIONS} heads",
            "megatron": f"GPTModel {args.trunk_layers + 1} layers + mtp_num_layers {N_PREDICTIONS - 1}",
        },
    }
    for name in MODELS:
        per_step = losses[name]
        out[f"{name}_params"] = memory[name]["params"]
        out[f"{name}_peak_mib"] = memory[name]["peak_bytes"] / 2**20
        if "rss_peak_bytes" in memory[name]:
            out[f"{name}_rss_peak_mib"] = memory[name]["rss_peak_bytes"] / 2**20
        out[f"{name}_step_s"] = statistics.median(times[name])
        out[f"{name}_step_times_s"] = times[name]
        out[f"{name}_losses"] = per_step  # per step: mean CE of predictions t+1 .. t+4
        out[f"{name}_loss_first"] = statistics.fmean(per_step[0])
        out[f"{name}_loss_last"] = statistics.fmean(per_step[-1])
        out[f"{name}_loss_decreased"] = (
            len(per_step) > 1 and out[f"{name}_loss_last"] < out[f"{name}_loss_first"]
        )
    out["memory_ratio"] = out["megatron_peak_mib"] / out["ours_peak_mib"]
    out["time_ratio"] = out["megatron_step_s"] / out["ours_step_s"]
    return out


def print_table(r: dict) -> None:
    c = r["config"]
    print(
        f"\nmegatron-core MTP vs ours: {c['ours']} | {c['megatron']} "
        f"(d={c['hidden']}, {c['heads']} heads, T={c['seq']}, B={c['batch']}, V={c['vocab']}, fp32, "
        f"attention: {c['attention']}, "
        f"{c['device']}; {c['steps']} timed steps after {c['warmup']} warm-up, interleaved)"
    )
    rss = "ours_rss_peak_mib" in r
    rss_column = f" {'RSS peak MiB':>13}" if rss else ""
    print(
        f"{'model':<9} {'params':>11} {'step s':>8} {'step peak MiB':>14}{rss_column}"
        f"  {'loss first -> last':<19} {'falls':>5}"
    )
    for name in MODELS:
        line = (
            f"{name:<9} {r[f'{name}_params']:>11,} {r[f'{name}_step_s']:>8.3f} {r[f'{name}_peak_mib']:>14.1f}"
        )
        if rss:
            line += f" {r[f'{name}_rss_peak_mib']:>13.1f}"
        line += f"  {r[f'{name}_loss_first']:>7.4f} -> {r[f'{name}_loss_last']:<7.4f}"
        print(line + f" {'yes' if r[f'{name}_loss_decreased'] else 'NO':>5}")
    print(f"megatron / ours: memory {r['memory_ratio']:.2f}x, time {r['time_ratio']:.2f}x")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_child:
        result = memory_child(args)
        print(_MEMORY_MARK + json.dumps(result), flush=True)
        return result
    return report(run(args, argv), print_table, args.json)


if __name__ == "__main__":
    main()
