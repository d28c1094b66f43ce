"""The DeepSpeed engine (``parallel.engine=deepspeed``): ZeRO 0-3 with optional CPU offload, PP = 1, TP from
the same megatron-core layers (DeepSpeed learns the groups through :class:`MegatronMpu`).

Exact MTP gradients under ZeRO: DeepSpeed reduces (stage 2/3: partitions) a parameter's gradient when its
``.grad`` is accumulated, so every parameter must receive its gradient exactly once per micro-batch, and
``engine.backward`` must run once per micro-batch. The memory-efficient loss (loss.py) already works that
way: its autograd Function runs the n heads' forward+backward inside its *forward* with
``torch.autograd.grad`` (which never touches ``.grad``) and accumulates the shared unembedding's gradient
by hand, then its backward hands each head parameter and the unembedding one gradient. So one
``engine.backward(loss)`` per micro-batch gives the naive loss's gradients, on every ZeRO stage
(tests/integration/distributed/test_deepspeed.py checks parameters against a single-process run).
ZeRO-3 is the exception: it partitions the parameters themselves and gathers them only inside its module
hooks, which the per-head backward inside the Function bypasses; there the naive loss
(``mtp.memory_efficient=false``: all heads in one graph, plain autograd through the modules) is required.

The LR/WD schedule is megatron's OptimizerParamScheduler on the torch AdamW param groups, exactly as the
megatron engine (decay on matrices, none on norms). A non-finite loss never reaches the optimizer; with
ZeRO the partially reduced gradients cannot be dropped safely outside fp16, so the step aborts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from torch import Tensor

from mtp_pretrain import compat
from mtp_pretrain.config import OptimConfig, ParallelConfig
from mtp_pretrain.engine.base import (
    Batch,
    EngineBase,
    NonFiniteLossError,
    StepResult,
    reduce_outputs,
    step_normalization,
    take,
)
from mtp_pretrain.targets import HeadStats

_TAG = "state"  # one DeepSpeed tag per checkpoint directory: <ckpt>/deepspeed/state/


class MegatronMpu:
    """What DeepSpeed asks a model-parallel unit for, answered by megatron's parallel_state."""

    # DeepSpeed asks for the "model parallel" group by both names: it is the tensor-parallel one
    get_model_parallel_rank = get_tensor_model_parallel_rank = staticmethod(
        parallel_state.get_tensor_model_parallel_rank
    )
    get_model_parallel_world_size = get_tensor_model_parallel_world_size = staticmethod(
        parallel_state.get_tensor_model_parallel_world_size
    )
    get_model_parallel_group = get_tensor_model_parallel_group = staticmethod(
        parallel_state.get_tensor_model_parallel_group
    )
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size
    )
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)


def deepspeed_config(
    p: ParallelConfig, optim: OptimConfig, micro_batch: int, grad_accum: int, bf16: bool
) -> dict:
    """The DeepSpeed JSON generated from our config, with ``parallel.deepspeed_config`` merged over it."""
    dp = parallel_state.get_data_parallel_world_size()
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": compat.cuda_available()}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": compat.cuda_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * dp,
        "gradient_clipping": optim.clip_grad,  # DeepSpeed's default is 1.0: always set it from ours
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch AdamW (nothing to compile)
        "zero_force_ds_cpu_optimizer": False,  # offload with torch AdamW instead of compiling DeepSpeedCPUAdam
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.deepspeed_config:
        config = _merge(config, json.loads(Path(p.deepspeed_config).read_text()))
    return config


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """Weight decay on matrices only (norm weights have none), as megatron's optimizer does."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": optim.weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]


class DeepSpeedEngine(EngineBase):
    """One model (PP = 1) in a DeepSpeed engine; the Engine protocol of engine/base.py."""

    def __init__(
        self,
        model: torch.nn.Module,
        optim: OptimConfig,
        total_steps: int,
        parallel: ParallelConfig,
        micro_batch: int,
        grad_accum: int,
        bf16: bool = False,
    ) -> None:
        import deepspeed

        compat.apply_deepspeed()
        # DeepSpeed insists on LOCAL_RANK; a plain single process (our private world of one) has none
        os.environ.setdefault("LOCAL_RANK", "0")
        self.config = deepspeed_config(parallel, optim, micro_batch, grad_accum, bf16)
        optimizer = torch.optim.AdamW(
            _param_groups(model, optim), lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps
        )
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config, mpu=MegatronMpu(), dist_init_required=False
        )
        self.scheduler = self._schedule(self.optimizer, optim, total_steps)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def models(self) -> list[torch.nn.Module]:
        return [self.ds.module]

    def _forward(self, batch: Batch) -> tuple[Tensor, HeadStats]:
        dev = compat.device()
        return self.ds(*(t.to(dev, non_blocking=True) for t in batch))

    def train_step(
        self,
        batches: Iterator[Batch],
        num_microbatches: int,
        seq_len: int,
        micro_batch: int,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> StepResult:
        if self.ds.gradient_accumulation_steps() != num_microbatches:
            raise ValueError(
                f"{num_microbatches} micro-batches, DeepSpeed was set up for {self.ds.gradient_accumulation_steps()}"
            )
        self.ds.train()
        outputs = []
        mbs = take(batches, num_microbatches)
        # DeepSpeed divides each micro-batch's loss by grad_accum and averages the gradients over DP ranks:
        # mtp.loss_normalization=global cancels both (targets.StepCounts)
        with step_normalization(self.models, mbs, seq_len):
            for m, batch in enumerate(mbs):
                loss, stats = self._forward(batch)
                outputs.append({"loss": loss.detach().clone(), "stats": stats})
                self.ds.backward(loss)  # once per micro-batch (scaled by 1/grad_accum inside)
                if m < num_microbatches - 1:
                    self.ds.step()  # DeepSpeed counts micro-steps here; it updates only at the boundary (the last)
        loss, stats = reduce_outputs(outputs)
        nonfinite, stop = self._agree(outputs, stop_requested)
        if nonfinite:
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) with parallel.engine=deepspeed: ZeRO cannot drop a step's partly "
                f"reduced gradients outside fp16, so the run stops here (nothing saved after the last checkpoint)"
            )
        self.ds.step()  # the boundary: reduce, clip, update
        self.scheduler.step(increment=1)
        norm = self.ds.get_global_grad_norm()
        return StepResult(
            loss, stats, float(norm if norm is not None else 0.0), self.lr, skipped=False, stop=stop
        )

    @torch.no_grad()
    def eval_step(
        self, batches: Iterator[Batch], num_microbatches: int, seq_len: int, micro_batch: int
    ) -> tuple[float, HeadStats | None]:
        self.ds.eval()
        mbs = take(batches, num_microbatches)
        with step_normalization(self.models, mbs, seq_len):  # as in training: one denominator per head
            outputs = [dict(zip(("loss", "stats"), self._forward(batch), strict=True)) for batch in mbs]
        return reduce_outputs(outputs)

    def save(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory / "deepspeed"), tag=_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        """Same DP size: DeepSpeed's own load. Another DP size (DeepSpeed refuses a direct load): convert to
        its universal format first (``ds_to_universal --inject_missing_state``, rank 0, into a hidden
        ``.tmp-`` sibling of the checkpoint that the next save cleans up) and load that."""
        root, tag = directory / "deepspeed", _TAG
        saved_dp = len(list((root / _TAG).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
        if saved_dp and saved_dp != parallel_state.get_data_parallel_world_size():
            root, tag = directory.parent / f".tmp-universal-{directory.name}", f"{_TAG}_universal"
            if torch.distributed.get_rank() == 0 and not (root / tag).is_dir():
                _to_universal(directory / "deepspeed" / _TAG, root / tag)
            torch.distributed.barrier()
            self.ds._config.load_universal_checkpoint = True
        try:
            path, _ = self.ds.load_checkpoint(
                str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed found no engine state in {root / tag}")

    def load_model_weights(self, ckpt: Path, keep: Callable[[str], bool]) -> None:
        raise NotImplementedError(
            "trainer.init_from with parallel.engine=deepspeed: start the finetune with the megatron engine "
            "(or export the weights) — DeepSpeed checkpoints load whole"
        )


def _to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's universal conversion of ``source`` into ``target`` (complete or absent)."""
    import argparse
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    partial = target.with_name(target.name + ".partial")
    staged = target.with_name(target.name + ".input")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    # The converter casts every module entry to float; megatron modules also hold non-tensor `_extra_state`
    # entries. Stage the input with those dropped from the model-state files (the rest linked, not copied).
    for f in source.iterdir():
        if f.name.startswith("mp_rank_") and f.name.endswith("_model_states.pt"):
            state = torch.load(
                f, map_location="cpu", weights_only=False
            )  # our own run's file, DeepSpeed format
            state["module"] = {k: v for k, v in state["module"].items() if isinstance(v, torch.Tensor)}
            torch.save(state, staged / f.name)
        else:
            (staged / f.name).symlink_to(f.resolve())
    args = argparse.Namespace(
        input_folder=str(staged),
        output_folder=str(partial),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    shutil.rmtree(staged)
    partial.rename(target)
