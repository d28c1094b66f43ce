"""Our MTP vs megatron-core's built-in MTP (DeepSeek-V3 style) on the same trunk: peak memory and step time.

What is compared (no parallelism, fp32, megatron's local layer spec everywhere (ATTENTION: our
model.attention=local, megatron's unfused DotProductAttention), CPU-safe config overrides, the same
hidden size, attention heads, vocabulary, sequence length and batch; each model its own initialisation):
 - ours: MTPModel with a trunk of K layers and n=4 parallel heads (head 1 is the next-token head), each
   head one transformer layer on the trunk output, shared final norm and unembedding, the
   memory-efficient loss (one head's logits alive at a time). K + 4 transformer layers.
 - megatron: GPTModel(num_layers=K + 1, mtp_num_layers=3, mtp_block_spec=get_gpt_mtp_block_spec(...)):
   the trunk plus one layer, so its next-token path is as deep as our head 1, and 3 MTP layers (each
   enorm/hnorm + eh_proj [2d -> d] + one transformer layer + its own final norm), chained: depth k reads
   depth k-1's output and the embedding of the input shifted by k. Also K + 4 transformer layers.
   Its MTP losses are weighted like ours (mtp_loss_scaling_factor = 3, so each depth's mean CE has
   weight 1, as every one of our heads).
 - ours-sequential: MTPModel with mtp.head_type=sequential, megatron's design in our model: head 1 one
   block on the trunk, heads 2..4 DeepSeek-V3 MTP modules with megatron's submodules (enorm/hnorm +
   eh_proj + one block + own final norm; head k reads head k-1's output and the embedding of the input
   shifted by k-1; model/heads.py), trained through our loss's chained path (loss.py: the heads' forward,
   then a reverse pass re-running each head's forward; only d-sized tensors kept per head, one head's
   logits alive at a time). K + 4 transformer layers, every prediction weighing 1.
All predict tokens t+1..t+4 at each of T positions (megatron's depth k masks its last k positions).

How. All models are trained by the same engine, mtp_pretrain.engine.megatron.MegatronEngine (megatron
DDP + DistributedOptimizer + megatron's forward/backward schedule), with the same optimizer settings
(OptimConfig defaults, but no LR warm-up so the few steps move the loss). Megatron's GPTModel is wrapped
in a thin adapter whose forward takes our batch (tokens, target validity) and returns what the engine's
loss function expects, (loss, stats): the next-token loss GPTModel returns, averaged over valid
targets, and each depth's mean loss from megatron's MTPLossLoggingHelper. The MTP losses reach the
gradients the way megatron does it: MTPLossAutoScaler adds their gradient in backward, scaled by the
schedule (grad_scale_func / micro-batches), which the engine's schedule sets as in megatron's training.
Measured as mtp_pretrain/bench/versus.py says: each model's peak memory of one training step (forward,
backward, optimizer step, over what lives between steps) in a fresh subprocess of its own, the step
times interleaved in this process (the median), every prediction's loss per step; each model trains on
one fixed batch (the same tokens for all) and its loss must fall over the steps.
Ratios: megatron / ours (memory_ratio, time_ratio) and ours-sequential / megatron (sequential_memory_ratio,
sequential_time_ratio; the goal: memory below 1, time at most 1).

    python tools/bench_megatron_mtp.py [--hidden 256 --heads 4 --trunk-layers 2 --seq 256 --batch 4
                                        --vocab 32768 --steps 3 --json out.json]
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import torch

from mtp_pretrain import compat
from mtp_pretrain.bench.models import bench_model, on_device, shape_config
from mtp_pretrain.bench.options import add_shape_args, bench_parser, report
from mtp_pretrain.bench.versus import Builder, add_run_args, memory_child, optim, run_models
from mtp_pretrain.targets import HeadStats

MODELS = ("ours", "megatron", "ours-sequential", "ours-sequential-kept")
# every model's core attention (model/attention.py): the same kernel on all sides, so that only the MTP
# designs differ; megatron's unfused DotProductAttention, as this comparison always ran
ATTENTION = "local"
N_PREDICTIONS = 4  # ours: n=4 heads; megatron: next-token + mtp_num_layers=3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_shape_args(
        p, hidden=256, heads=4, trunk_layers=2, seq=256, batch=4, vocab=32768
    )  # megatron: K+1 layers
    add_run_args(p, MODELS)
    p.set_defaults(attention=ATTENTION)  # read by bench_model's shape_config: our model.attention
    return p.parse_args(argv)


# -- the models, each in a MegatronEngine -----------------------------------------------------------------


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


def build_ours(args: argparse.Namespace, head_type: str = "parallel", **mtp: Any) -> tuple[Any, int]:
    """(MegatronEngine over MTPModel with a K-layer trunk and 4 heads of ``head_type`` (``mtp``: further
    MTPConfig fields), sample length T + 4)."""
    from mtp_pretrain.engine.megatron import MegatronEngine

    # every prediction weighs 1
    _, _, tconf, model = bench_model(
        args, N_PREDICTIONS, loss_weights=[1.0] * N_PREDICTIONS, head_type=head_type, **mtp
    )
    return MegatronEngine(model, tconf, optim(), 1000), args.seq + N_PREDICTIONS


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
    return MegatronEngine(MegatronMTPAdapter(on_device(gpt)), tconf, optim(), 1000), args.seq + 1


BUILDERS: dict[str, Builder] = {
    "ours": build_ours,
    "megatron": build_megatron,
    "ours-sequential": functools.partial(build_ours, head_type="sequential"),
    # mtp.chain_recompute=false: every head's activations kept, no second forward of the head blocks
    "ours-sequential-kept": functools.partial(build_ours, head_type="sequential", chain_recompute=False),
}


def prefix(name: str) -> str:
    """A model's key prefix in the JSON result ("ours-sequential" -> "ours_sequential")."""
    return name.replace("-", "_")


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    models = run_models("mtp_pretrain.bench.megatron_mtp", argv, BUILDERS, args, args.seq + N_PREDICTIONS)
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
            "ours": f"MTPModel trunk {args.trunk_layers} + {N_PREDICTIONS} parallel heads",
            "megatron": f"GPTModel {args.trunk_layers + 1} layers + mtp_num_layers {N_PREDICTIONS - 1}",
            "ours-sequential": f"MTPModel trunk {args.trunk_layers} + {N_PREDICTIONS} sequential heads "
            "(1 block + 3 DeepSeek-V3 MTP modules)",
            "ours-sequential-kept": "the same with mtp.chain_recompute=false",
        },
    }
    for name, figures in models.items():  # per step, losses: mean CE of predictions t+1 .. t+4
        out |= {f"{prefix(name)}_{key}": value for key, value in figures.items()}
    out["memory_ratio"] = out["megatron_peak_mib"] / out["ours_peak_mib"]
    out["time_ratio"] = out["megatron_step_s"] / out["ours_step_s"]
    # the same design as megatron's MTP, our implementation: ours-sequential / megatron (goal: < 1, <= 1)
    out["sequential_memory_ratio"] = out["ours_sequential_peak_mib"] / out["megatron_peak_mib"]
    out["sequential_time_ratio"] = out["ours_sequential_step_s"] / out["megatron_step_s"]
    out["sequential_kept_memory_ratio"] = out["ours_sequential_kept_peak_mib"] / out["megatron_peak_mib"]
    out["sequential_kept_time_ratio"] = out["ours_sequential_kept_step_s"] / out["megatron_step_s"]
    return out


def print_table(r: dict) -> None:
    c = r["config"]
    print(
        f"\nmegatron-core MTP vs ours: {c['ours']} | {c['megatron']} | {c['ours-sequential']} "
        f"| {c['ours-sequential-kept']} "
        f"(d={c['hidden']}, {c['heads']} heads, T={c['seq']}, B={c['batch']}, V={c['vocab']}, fp32, "
        f"attention: {c['attention']}, "
        f"{c['device']}; {c['steps']} timed steps after {c['warmup']} warm-up, interleaved)"
    )
    rss = "ours_rss_peak_mib" in r
    rss_column = f" {'RSS peak MiB':>13}" if rss else ""
    print(
        f"{'model':<20} {'params':>11} {'step s':>8} {'step peak MiB':>14}{rss_column}"
        f"  {'loss first -> last':<19} {'falls':>5}"
    )
    for name in MODELS:
        k = prefix(name)
        line = f"{name:<20} {r[f'{k}_params']:>11,} {r[f'{k}_step_s']:>8.3f} {r[f'{k}_peak_mib']:>14.1f}"
        if rss:
            line += f" {r[f'{k}_rss_peak_mib']:>13.1f}"
        line += f"  {r[f'{k}_loss_first']:>7.4f} -> {r[f'{k}_loss_last']:<7.4f}"
        print(line + f" {'yes' if r[f'{k}_loss_decreased'] else 'NO':>5}")
    print(f"megatron / ours: memory {r['memory_ratio']:.2f}x, time {r['time_ratio']:.2f}x")
    print(
        f"ours-sequential / megatron: memory {r['sequential_memory_ratio']:.2f}x, "
        f"time {r['sequential_time_ratio']:.2f}x; kept graphs (mtp.chain_recompute=false): memory "
        f"{r['sequential_kept_memory_ratio']:.2f}x, time {r['sequential_kept_time_ratio']:.2f}x"
    )


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(BUILDERS[args.memory_child], args, args.seq + N_PREDICTIONS)
    return report(run(args, argv), print_table, args.json)


if __name__ == "__main__":
    main()
