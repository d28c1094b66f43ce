"""Run under torchrun (gloo): train a fixed tiny model on fixed data in several TP x PP x DP layouts.

    torchrun --nproc-per-node=W tests/distributed/layout_parity.py OUT_DIR LAYOUT [LAYOUT ...]
    LAYOUT = tp,pp[,tie|uneven|vpp2][,local]  (dp = W / (tp * pp); tie: tied embeddings across first and
             last stage, n=4 only; uneven: 3 + 1 trunk layers on 2 stages, n=1 only; vpp2: interleaved, n=1
             only; local: megatron's DotProductAttention, else model.attention=sdpa)

For each layout and n in {1, 4} it runs STEPS optimizer steps with grad accumulation GA per DP rank,
writes the per-step per-head losses (OUT_DIR/<layout>-n<n>.json, logging rank) and saves the final engine
state (model chunks + optimizer) with dist_checkpointing (OUT_DIR/<layout>-n<n>/), which the pytest side loads into a single-process
model (resharding) to compare parameters with a single-process run of the same global batches.
"""

import json
import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from mtp_pretrain import parallel
from mtp_pretrain.build import build_pipeline_chunks
from mtp_pretrain.config import ModelConfig, MTPConfig, OptimConfig
from mtp_pretrain.engine.megatron import MegatronEngine
from mtp_pretrain.model.mtp_model import transformer_config

VOCAB, STEPS, GA, MICRO = 256, 6, 2, 2
OPTIM = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, clip_grad=1.0)


def model_cfg(n: int, tie: bool = False, attention: str = "sdpa") -> ModelConfig:
    # trunk of 4 layers for n=1 and 2 for n=4: both split evenly over 2 pipeline stages; the core attention
    # named, not auto (which would pick Transformer Engine where it imports)
    return ModelConfig(
        preset="parity",
        num_layers=5 if n == 1 else 6,
        hidden_size=64,
        num_attention_heads=4,
        seq_len=16,
        tie_embeddings=tie,
        attention=attention,
    )


def global_batch(step: int, n: int, rows: int) -> torch.Tensor:
    """The same global batch for every layout: rows = micro-batch x grad-accumulation x dp of the layout."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (rows, model_cfg(n).seq_len + n), generator=g)


def micro_batches(step: int, n: int, dp: int, dp_rank: int, ga: int) -> list[torch.Tensor]:
    """Micro-batch m of DP rank r holds global rows [(m*dp + r)*MICRO, ...): mean of means = one big mean.

    A single process with ga' = ga*dp micro-batches therefore sees exactly the same global batch.
    """
    batch = global_batch(step, n, MICRO * ga * dp)
    return [batch[(m * dp + dp_rank) * MICRO : (m * dp + dp_rank + 1) * MICRO] for m in range(ga)]


def build_engine(
    n: int,
    tp: int,
    pp: int,
    tie: bool = False,
    uneven: bool = False,
    vpp: int | None = None,
    attention: str = "sdpa",
) -> MegatronEngine:
    cfg, mtp = model_cfg(n, tie, attention), MTPConfig(n=n)
    stage_layers = (3, None) if uneven else (None, None)  # n=1: 4 trunk layers as 3 + 1
    tconf = transformer_config(cfg, mtp, tp=tp, pp=pp, stage_layers=stage_layers, vpp=vpp)
    model = build_pipeline_chunks(cfg, mtp, VOCAB, tconf)
    # overlapped reduction in many small buckets: a bucket holding the shared unembedding (or any head) must
    # not be reduced before the last head's gradient is in, or DP layouts drift from one process
    return MegatronEngine(model, tconf, OPTIM, STEPS, overlap_grad_reduce=True, bucket_size=4096)


def run(
    n: int,
    tp: int,
    pp: int,
    dp: int,
    ga: int = GA,
    tie: bool = False,
    uneven: bool = False,
    vpp: int | None = None,
    attention: str = "sdpa",
) -> tuple[list[dict], MegatronEngine]:
    engine = build_engine(n, tp, pp, tie, uneven, vpp, attention)
    dp_rank = parallel_state.get_data_parallel_rank()
    history = []
    for step in range(STEPS):
        mbs = micro_batches(step, n, dp, dp_rank, ga)
        it = iter([(t, torch.ones_like(t, dtype=torch.bool)) for t in mbs])
        result = engine.train_step(it, ga, model_cfg(n).seq_len, MICRO)
        if result.head_stats is not None:
            history.append(
                {"loss": result.loss, **result.head_stats.metrics(), "grad_norm": result.grad_norm}
            )
    return history, engine


def save_run(out: Path, name: str, sharded: dict, history: list[dict]) -> None:
    """OUT/<name>/ (dist_checkpointing of ``sharded``) and OUT/<name>.json (the logging rank's history)."""
    if torch.distributed.get_rank() == 0:
        (out / name).mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded, str(out / name))
    if parallel.is_logging_rank():
        (out / f"{name}.json").write_text(json.dumps(history))
    torch.distributed.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    parallel.init_distributed()  # the world; model-parallel groups are rebuilt per layout below
    world = torch.distributed.get_world_size()
    for spec in sys.argv[
        2:
    ]:  # "tp,pp" or "tp,pp,tie" (tied embeddings, n=4) or "tp,pp,uneven" (3+1 layers, n=1)
        tp, pp, *flags = spec.split(",")
        tp, pp, tie, uneven = int(tp), int(pp), "tie" in flags, "uneven" in flags
        vpp = 2 if "vpp2" in flags else None
        attention = "local" if "local" in flags else "sdpa"
        dp = parallel.Layout(world, tp=tp, pp=pp).dp
        for n in (4,) if tie else (1,) if uneven or vpp else (1, 4):
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                virtual_pipeline_model_parallel_size=vpp,
            )
            model_parallel_cuda_manual_seed(0)
            history, engine = run(n, tp, pp, dp, tie=tie, uneven=uneven, vpp=vpp, attention=attention)
            name = f"tp{tp}pp{pp}dp{dp}-n{n}" + "".join(f"-{f}" for f in flags)
            # the engine's whole state (model chunks + DistributedOptimizer), as the trainer checkpoints it
            save_run(out, name, engine.sharded_state_dict(), history)
    parallel.destroy_distributed()


if __name__ == "__main__":
    main()
