"""Run under torchrun (gloo): train a fixed tiny model on fixed data in several TP x PP x DP layouts.

    torchrun --nproc-per-node=W tests/distributed/layout_parity.py OUT_DIR LAYOUT [LAYOUT ...]
    LAYOUT = tp,pp[,tie|uneven|vpp2|masked|types][,local]  (dp = W / (tp * pp); tie: tied embeddings across
             first and last stage, n=4 only; uneven: 3 + 1 trunk layers on 2 stages, n=1 only; vpp2:
             interleaved, n=1 only; local: megatron's DotProductAttention, else model.attention=sdpa; masked:
             see below; types: n=4 with each head type of HEAD_TYPES (+ sequential with tied embeddings under
             PP, the last stage's embedding copy being the output layer), saved as heads-<type>-tp..pp..dp..)

For each layout and n in {1, 4} it runs STEPS optimizer steps with grad accumulation GA per DP rank,
writes the per-step per-head losses (OUT_DIR/<layout>-n<n>.json, logging rank) and saves the final engine
state (model chunks + optimizer) with dist_checkpointing (OUT_DIR/<layout>-n<n>/), which the pytest side loads into a single-process
model (resharding) to compare parameters with a single-process run of the same global batches.

``masked`` (n=4, instead of the above): the global batches with very uneven valid targets (padding, document
boundaries; :func:`masked_batch`), under ``mtp.loss_normalization=global`` (STEPS steps: history, final state
and the first step's reduced gradients, OUT_DIR/masked-dp<dp>-global[.json|/|-grads.pt]) and ``micro_batch``
(one step's gradients, the control that must differ), and one step's gradients of each head type of
HEAD_TYPES under global (OUT_DIR/masked-dp<dp>-<type>-grads.pt). The reference is one process on the
concatenated batch.
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
from mtp_pretrain.targets import target_mask

VOCAB, STEPS, GA, MICRO = 256, 6, 2, 2
# the head types beyond the default parallel one, looped inside the "types" and "masked" specs
HEAD_TYPES = ("linear", "causal", "anticausal", "sequential")
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


EOS, PAD = 0, 1
# rows of the masked global batch (MICRO x GA x 2 = 8): where its padding starts (20 = none), and how often a
# document ends. Micro-batch m of DP rank r holds rows (2m + r) * MICRO..: rank 0's first is nearly whole, its
# second mostly padding, rank 1's in between (valid targets of head 1: 32, 6, 21, 20; of head 4: 32, 1, 11, 8)
PAD_FROM, EOS_RATE = (20, 20, 20, 10, 3, 6, 12, 20), (0.0, 0.05, 0.1, 0.2, 0.0, 0.3, 0.2, 0.4)


def masked_batch(step: int, n: int, rows: int = len(PAD_FROM)) -> tuple[torch.Tensor, ...]:
    """(tokens, valid, segments) of the masked global batch of ``step``: :func:`global_batch` with documents
    ending at random (the targets across a boundary masked, data.mask_doc_boundaries) and rows padded."""
    tokens = global_batch(step, n, rows)
    tokens[(tokens == EOS) | (tokens == PAD)] = 2  # no accidental document end or padding
    g = torch.Generator().manual_seed(2000 + step)
    for row, (pad_from, rate) in enumerate(zip(PAD_FROM, EOS_RATE, strict=True)):
        tokens[row, torch.rand(tokens.shape[1], generator=g) < rate] = EOS
        tokens[row, pad_from:] = PAD
    return (tokens, *target_mask(tokens, EOS, PAD, mask_doc_boundaries=True))


def masked_micro_batches(step: int, n: int, dp: int, dp_rank: int, ga: int, micro: int) -> list[tuple]:
    """This rank's micro-batches of the masked global batch, split as :func:`micro_batches` splits; dp = ga =
    1 with micro = all rows is the single process on the concatenated batch."""
    batch = masked_batch(step, n)
    return [
        tuple(t[(m * dp + dp_rank) * micro : (m * dp + dp_rank + 1) * micro] for t in batch)
        for m in range(ga)
    ]


def full_grads(engine: MegatronEngine) -> dict[str, torch.Tensor]:
    """The step's DP-reduced gradients, whole on every rank (call before the optimizer clips them in place).
    The DistributedOptimizer's reduce-scatter leaves each rank only its own shard of every bucket reduced:
    gather the shards first."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for group in engine.model.bucket_groups:
        size = group.intra_distributed_optimizer_instance_size
        rank = group.intra_distributed_optimizer_instance_rank
        for bucket in group.buckets:
            own = shard_buffer(bucket.grad_data, size)[rank].clone()
            torch.distributed.all_gather_into_tensor(
                bucket.grad_data, own, group=group.intra_distributed_optimizer_instance_group
            )
    return {k: p.main_grad.detach().clone() for k, p in engine.model.module.named_parameters()}


def run_masked(
    n: int,
    dp: int,
    ga: int,
    micro: int,
    normalization: str = "global",
    steps: int = STEPS,
    head_type: str = "parallel",
) -> tuple[list[dict], dict[str, torch.Tensor], MegatronEngine]:
    """``steps`` steps on the masked batches (TP = PP = 1): (history, the first step's gradients, engine)."""
    engine = build_engine(n, 1, 1, normalization=normalization, head_type=head_type)
    first: dict[str, torch.Tensor] = {}
    step_fn = engine.optimizer.step

    def capturing_step():  # noqa: ANN202
        if not first:
            first.update(full_grads(engine))
        return step_fn()

    engine.optimizer.step = capturing_step
    dp_rank, history = parallel_state.get_data_parallel_rank(), []
    for step in range(steps):
        mbs = masked_micro_batches(step, n, dp, dp_rank, ga, micro)
        result = engine.train_step(iter(mbs), ga, model_cfg(n).seq_len, micro)
        history.append({"loss": result.loss, **result.head_stats.metrics(), "grad_norm": result.grad_norm})
    return history, first, engine


def masked_reference() -> tuple[list[dict], dict, dict, MegatronEngine]:
    """One process on the concatenated masked batches (n=4, one micro-batch of all rows): history, the first
    step's gradients, final parameters, engine (the pytest side's reference of the ``masked`` runs)."""
    history, grads, engine = run_masked(4, dp=1, ga=1, micro=len(PAD_FROM))
    params = {
        k: v.detach().clone() for k, v in engine.model.module.state_dict().items() if "_extra_state" not in k
    }
    return history, grads, params, engine


def build_engine(
    n: int,
    tp: int,
    pp: int,
    tie: bool = False,
    uneven: bool = False,
    vpp: int | None = None,
    attention: str = "sdpa",
    normalization: str = "global",
    head_type: str = "parallel",
) -> MegatronEngine:
    cfg = model_cfg(n, tie, attention)
    mtp = MTPConfig(n=n, loss_normalization=normalization, head_type=head_type)
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
    head_type: str = "parallel",
) -> tuple[list[dict], MegatronEngine]:
    engine = build_engine(n, tp, pp, tie, uneven, vpp, attention, head_type=head_type)
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


def run_masked_variants(out: Path, tp: int, pp: int, dp: int) -> None:
    """The ``masked`` spec (TP = PP = 1): global normalization (history, final state, first gradients) and
    the micro_batch control (first gradients), n=4, grad accumulation GA."""
    assert tp == pp == 1, "masked runs DP only"
    variants = [("global", STEPS, "parallel"), ("micro_batch", 1, "parallel")]
    variants += [("global", 1, head_type) for head_type in HEAD_TYPES]
    for normalization, steps, head_type in variants:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel()
        model_parallel_cuda_manual_seed(0)
        history, grads, engine = run_masked(4, dp, GA, MICRO, normalization, steps, head_type)
        name = f"masked-dp{dp}-{normalization if head_type == 'parallel' else head_type}"
        if torch.distributed.get_rank() == 0:
            torch.save(grads, out / f"{name}-grads.pt")
        if normalization == "global" and head_type == "parallel":
            save_run(out, name, engine.sharded_state_dict(), history)


def run_head_types(out: Path, tp: int, pp: int, dp: int) -> None:
    """The ``types`` spec: n=4 with every head type of HEAD_TYPES (+ sequential, tied, under PP)."""
    variants = [(t, False) for t in HEAD_TYPES] + ([("sequential", True)] if pp > 1 else [])
    for head_type, tie in variants:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
        model_parallel_cuda_manual_seed(0)
        history, engine = run(4, tp, pp, dp, tie=tie, head_type=head_type)
        name = f"heads-{head_type}{'-tie' if tie else ''}-tp{tp}pp{pp}dp{dp}"
        save_run(out, name, engine.sharded_state_dict(), history)


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
        if "masked" in flags:
            run_masked_variants(out, tp, pp, dp)
            continue
        if "types" in flags:
            run_head_types(out, tp, pp, dp)
            continue
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
