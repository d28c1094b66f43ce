"""The megatron engine: how gradients are reduced and the optimizer steps.

megatron DDP (contiguous grad buffers, optional overlapped reduce) + the DistributedOptimizer (ZeRO-1
style sharded optimizer state) + warmup/cosine OptimizerParamScheduler, driven by megatron's pipeline
schedules (which also do gradient accumulation). With one process it is the same code on a world of one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from mtp_pretrain.config import OptimConfig

Batch = tuple[Tensor, Tensor]  # tokens [B, T+n], target validity [B, T+n]


@dataclass
class StepResult:
    loss: float  # weighted total loss, mean over micro-batches (and data-parallel ranks)
    head_stats: Tensor | None  # [n, 3] summed (loss_sum, correct, count) over the step; last stage only
    grad_norm: float
    lr: float
    skipped: bool


class MegatronEngine:
    """Wraps one model chunk; `train_step` runs forward/backward over micro-batches and steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: TransformerConfig,
        optim: OptimConfig,
        total_steps: int,
        bf16: bool = False,
        overlap_grad_reduce: bool = False,
    ) -> None:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap_grad_reduce,
            use_distributed_optimizer=True,
        )
        self.model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        self.config = config
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.beta1,
                adam_beta2=optim.beta2,
                adam_eps=optim.eps,
                clip_grad=optim.clip_grad,
                bf16=bf16,
                params_dtype=config.params_dtype,
                use_distributed_optimizer=True,
            ),
            [self.model],
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
            lr_decay_style="cosine",
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=total_steps,
            wd_incr_style="constant",
        )
        # What megatron's own training loop wires into the config for its schedules.
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        if overlap_grad_reduce:
            config.no_sync_func = self.model.no_sync
            config.grad_sync_func = self.model.start_grad_sync

    def _forward_step(self, data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[Any, Callable]:
        tokens, valid = next(data_iterator)
        output = model(tokens, valid)

        def loss_func(out: tuple[Tensor, Tensor]) -> tuple[Tensor, dict]:
            loss, stats = out
            # the schedule divides the returned loss in place: report a detached copy
            return loss, {"loss": loss.detach().clone(), "stats": stats}

        return output, loss_func

    def _run(self, batches: Iterator[Batch], num_microbatches: int, seq_len: int, micro_batch: int, forward_only: bool):
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=batches,
            model=[self.model],
            num_microbatches=num_microbatches,
            seq_length=seq_len,
            micro_batch_size=micro_batch,
            forward_only=forward_only,
        )

    def train_step(self, batches: Iterator[Batch], num_microbatches: int, seq_len: int, micro_batch: int) -> StepResult:
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(batches, num_microbatches, seq_len, micro_batch, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        loss, stats = _reduce_outputs(outputs)
        return StepResult(
            loss=loss,
            head_stats=stats,
            grad_norm=float(grad_norm or 0.0),
            lr=self.optimizer.param_groups[0]["lr"],
            skipped=not ok,
        )

    @torch.no_grad()
    def eval_step(self, batches: Iterator[Batch], num_microbatches: int, seq_len: int, micro_batch: int) -> tuple[float, Tensor | None]:
        self.model.eval()
        return _reduce_outputs(self._run(batches, num_microbatches, seq_len, micro_batch, forward_only=True))

    # -- checkpoint protocol ------------------------------------------------------------------------
    def sharded_state_dict(self) -> dict:
        model_sd = self.model.sharded_state_dict()
        return {
            "model": model_sd,
            "optimizer": self.optimizer.sharded_state_dict(
                model_sd, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
            ),
        }

    def load_sharded_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def state_dict(self) -> dict:
        """Non-sharded engine state (the same on every rank): the LR/WD schedule."""
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])


def _reduce_outputs(outputs: list[dict]) -> tuple[float, Tensor | None]:
    """Mean loss over micro-batches and data-parallel ranks; per-head stats summed (last stage only)."""
    if not outputs:  # not the last pipeline stage
        return float("nan"), None
    loss = torch.stack([o["loss"] for o in outputs]).mean()
    stats = torch.stack([o["stats"] for o in outputs]).sum(0)
    dp = parallel_state.get_data_parallel_group()
    if torch.distributed.get_world_size(dp) > 1:
        packed = torch.cat([loss.view(1), stats.flatten()])
        torch.distributed.all_reduce(packed, group=dp)
        loss = packed[0] / torch.distributed.get_world_size(dp)
        stats = packed[1:].view_as(stats)
    return float(loss), stats
