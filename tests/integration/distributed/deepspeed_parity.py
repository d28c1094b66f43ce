"""Run under torchrun (gloo): the n=4 parity model trained by the DeepSpeed engine in several ZeRO layouts.

    torchrun --nproc-per-node=W tests/distributed/deepspeed_parity.py OUT_DIR SPEC [SPEC ...]
    SPEC = zero_stage,grad_accum[,tp2][,masked[,types]]   (dp = W / tp)

Same model, optimizer settings and global batches as layout_parity.py (its single-process megatron run is
the reference). For each SPEC: STEPS steps, per-step per-head losses (OUT_DIR/<name>.json, logging rank) and
the final model (gathered under ZeRO-3) saved with dist_checkpointing (OUT_DIR/<name>/) so the pytest side
can load it into a TP1 model and compare every parameter.

``masked``: layout_parity.py's masked batches (very uneven valid targets), mtp.loss_normalization=global; also
writes the first step's reduced gradients (OUT_DIR/masked-<name>-grads.pt), compared with one process on the
concatenated batch. ``types``: instead, one masked step of each head type of layout_parity.HEAD_TYPES (its
gradients only: OUT_DIR/masked-<name>-<type>-grads.pt).
"""

import sys
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from mtp_pretrain import parallel
from mtp_pretrain.build import build_model
from mtp_pretrain.config import MTPConfig, ParallelConfig
from mtp_pretrain.engine.deepspeed import DeepSpeedEngine
from mtp_pretrain.model.mtp_model import transformer_config
from tests.integration.distributed.layout_parity import (
    HEAD_TYPES,
    MICRO,
    OPTIM,
    STEPS,
    VOCAB,
    masked_micro_batches,
    micro_batches,
    model_cfg,
    save_run,
)

N = 4
RESHARD_SPEC = (
    "2,1"  # ZeRO-2 on 2 ranks: the checkpoint a 1-rank run converts to DeepSpeed's universal format
)


def capture_first_gradients(engine: DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """Filled with the first step's DP-reduced gradients, whole (DeepSpeed's safe_get_full_grad, a collective
    under ZeRO-3), at that step's boundary ``ds.step``, before it clips and updates."""
    from deepspeed.utils import safe_get_full_grad

    first: dict[str, torch.Tensor] = {}
    step = engine.ds.step

    def capturing_step(*args, **kw):  # noqa: ANN202
        if not first and engine.ds.is_gradient_accumulation_boundary():
            first.update(
                {k: safe_get_full_grad(p).detach().clone() for k, p in engine.module.named_parameters()}
            )
        return step(*args, **kw)

    engine.ds.step = capturing_step
    return first


def run(
    zero: int, ga: int, tp: int, masked: bool = False, head_type: str = "parallel", steps: int = STEPS
) -> tuple[list[dict], DeepSpeedEngine, dict]:
    """(history, engine, the first step's gradients when ``masked``, else {})."""
    cfg = model_cfg(N)
    # ZeRO-3 needs the naive loss (see engine/deepspeed.py)
    mtp = MTPConfig(n=N, memory_efficient=zero < 3, head_type=head_type)
    model = build_model(cfg, mtp, VOCAB, transformer_config(cfg, mtp, tp=tp))
    engine = DeepSpeedEngine(
        model, OPTIM, STEPS, ParallelConfig(engine="deepspeed", tp=tp, zero_stage=zero), MICRO, ga
    )
    first = capture_first_gradients(engine) if masked else {}
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    history = []
    for step in range(steps):
        if masked:
            mbs = masked_micro_batches(step, N, dp, dp_rank, ga, MICRO)
        else:
            mbs = [(t, torch.ones_like(t, dtype=torch.bool)) for t in micro_batches(step, N, dp, dp_rank, ga)]
        result = engine.train_step(iter(mbs), ga, cfg.seq_len, MICRO)
        history.append({"loss": result.loss, **result.head_stats.metrics(), "grad_norm": result.grad_norm})
    return history, engine, first


def main() -> None:
    import deepspeed  # here, not at import: test_deepspeed.py imports this module for its constants

    out = Path(sys.argv[1])
    parallel.init_distributed()
    world = torch.distributed.get_world_size()
    for spec in sys.argv[2:]:
        zero, ga, *flags = spec.split(",")
        zero, ga, tp, masked = int(zero), int(ga), 2 if "tp2" in flags else 1, "masked" in flags
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        model_parallel_cuda_manual_seed(0)
        name = ("masked-" if masked else "") + f"zero{zero}-ga{ga}-tp{tp}dp{world // tp}"
        if "types" in flags:
            for head_type in HEAD_TYPES:
                parallel_state.destroy_model_parallel()
                parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
                model_parallel_cuda_manual_seed(0)
                _, _, first = run(zero, ga, tp, masked, head_type, steps=1)
                if torch.distributed.get_rank() == 0:
                    torch.save(first, out / f"{name}-{head_type}-grads.pt")
            continue
        history, engine, first = run(zero, ga, tp, masked)
        if masked and torch.distributed.get_rank() == 0:
            torch.save(first, out / f"{name}-grads.pt")
        if spec == RESHARD_SPEC:  # its own checkpoint too: test_deepspeed.py resumes it on one process
            (out / f"{name}-engine").mkdir(exist_ok=True)
            engine.save(out / f"{name}-engine")
        # the model only (DeepSpeed's optimizer state is its own format); ZeRO-3 gathers the partitions first
        with deepspeed.zero.GatheredParameters(
            list(engine.module.parameters()), modifier_rank=None, enabled=zero == 3
        ):
            save_run(out, name, {"model": engine.module.sharded_state_dict()}, history)
    parallel.destroy_distributed()


if __name__ == "__main__":
    main()
