"""What every engine shares: the batch and step-result types, the Engine protocol the trainer talks to,
and the cross-rank reductions of the per-head loss statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from megatron.core import parallel_state
from torch import Tensor

from mtp_pretrain import compat

# tokens [B, T+n], target validity [B, T+n] (+ optional document numbers [B, T+n]): MTPModel.forward's inputs
Batch = tuple[Tensor, ...]


@dataclass
class StepResult:
    loss: float  # weighted total loss, mean over micro-batches (and data-parallel ranks)
    head_stats: Tensor | None  # [n, 3] summed (loss_sum, correct, count) over the step; last stage only
    grad_norm: float
    lr: float
    skipped: bool  # no update was applied (non-finite loss, or the optimizer refused the step)
    nonfinite: bool = False  # the loss of some rank was NaN/inf: the update was dropped on every rank


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN/inf loss) and the run must stop without saving."""


class Engine(Protocol):
    """How gradients are reduced and the optimizer steps; the trainer knows nothing else about it."""

    @property
    def module(self) -> torch.nn.Module:
        """The (first chunk of the) unwrapped model on this rank."""

    def train_step(self, batches: Iterator[Batch], num_microbatches: int, seq_len: int, micro_batch: int) -> StepResult: ...

    def eval_step(self, batches: Iterator[Batch], num_microbatches: int, seq_len: int, micro_batch: int) -> tuple[float, Tensor | None]: ...

    def save(self, directory: Path) -> None:
        """Write this rank's share of model + optimizer state into ``directory`` (a collective)."""

    def load(self, directory: Path) -> None:
        """Restore model + optimizer state written by ``save`` (a collective)."""

    def load_model_weights(self, ckpt: Path, keep: Callable[[str], bool]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (the losses live on the last stage only)."""
    t = torch.tensor([1.0 if flag else 0.0], device=compat.device())
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def reduce_outputs(outputs: list[dict]) -> tuple[float, Tensor | None]:
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
