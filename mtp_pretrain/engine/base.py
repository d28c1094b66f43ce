"""What every engine shares: the batch and step-result types, the Engine protocol the trainer talks to, the
base class with the LR schedule and the per-step agreement, and the cross-rank reduction of the statistics."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch import Tensor

from mtp_pretrain import compat
from mtp_pretrain.config import OptimConfig
from mtp_pretrain.errors import EXIT_NONFINITE, MTPError
from mtp_pretrain.loss import mtp_losses
from mtp_pretrain.targets import HeadStats, StepCounts, valid_counts

# tokens [B, T+n], target validity [B, T+n] (+ optional document numbers [B, T+n]): MTPModel.forward's inputs
Batch = tuple[Tensor, ...]


@dataclass
class StepResult:
    # weighted total loss sum_i w_i * (head i's mean CE): under mtp.loss_normalization=global the mean over
    # the step's valid targets (all micro-batches and DP ranks), under micro_batch the mean over micro-batches
    # and DP ranks of each micro-batch's mean
    loss: float
    head_stats: HeadStats | None  # summed over the step's micro-batches and DP ranks; last stage only
    grad_norm: float
    lr: float
    skipped: bool  # no update was applied (non-finite loss, or the optimizer refused the step)
    nonfinite: bool = False  # the loss of some rank was NaN/inf: the update was dropped on every rank
    stop: bool = False  # some rank was asked to stop (signal / stop file): every rank stops after this step


class NonFiniteLossError(MTPError, RuntimeError):
    """Training diverged (NaN/inf loss) and the run must stop without saving."""

    exit_code = EXIT_NONFINITE


class Engine(Protocol):
    """How gradients are reduced and the optimizer steps; the trainer knows nothing else about it."""

    @property
    def module(self) -> torch.nn.Module:
        """The (first chunk of the) unwrapped model on this rank."""

    @property
    def models(self) -> list[torch.nn.Module]:
        """Every unwrapped model chunk on this rank (several under virtual pipeline parallelism)."""

    def train_step(
        self,
        batches: Iterator[Batch],
        num_microbatches: int,
        seq_len: int,
        micro_batch: int,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> StepResult:
        """Forward/backward over the micro-batches, then the update unless some rank's loss is NaN/inf.
        ``stop_requested`` (this rank's wish to stop) is agreed across ranks in the same collective. The
        ``num_microbatches`` batches are read up front: under ``mtp.loss_normalization=global`` the loss
        divides by their valid targets, counted over all DP ranks (:func:`step_normalization`)."""

    def eval_step(
        self, batches: Iterator[Batch], num_microbatches: int, seq_len: int, micro_batch: int
    ) -> tuple[float, HeadStats | None]:
        """(weighted loss, per-head sums) of the micro-batches without gradients, normalized as training is."""

    def save(self, directory: Path) -> None:
        """Write this rank's share of model + optimizer state into ``directory`` (a collective)."""

    def load(self, directory: Path) -> None:
        """Restore model + optimizer state written by ``save`` (a collective)."""

    def load_model_weights(self, ckpt: Path, keep: Callable[[str], bool]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class EngineBase:
    """What both engines share: the warmup + cosine LR schedule and its state, and the one per-step
    agreement across ranks (non-finite loss, stop request)."""

    optimizer: Any
    scheduler: OptimizerParamScheduler

    def _schedule(self, optimizer: Any, optim: OptimConfig, total_steps: int) -> OptimizerParamScheduler:
        """megatron's scheduler over the optimizer's param groups (their wd_mult: no decay on norms)."""
        return OptimizerParamScheduler(
            optimizer,
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

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """Non-sharded engine state (the same on every rank): the LR/WD schedule."""
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    @staticmethod
    def _agree(outputs: list[dict], stop_requested: Callable[[], bool]) -> tuple[bool, bool]:
        """(some rank's loss is NaN/inf, some rank wants to stop): ONE max all-reduce over the world per step.
        The losses live on the last pipeline stage only, and a signal reaches only one process."""
        nonfinite = not all(torch.isfinite(o["loss"]).item() for o in outputs)
        flags = torch.tensor([float(nonfinite), float(stop_requested())], device=compat.device())
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())


def reduce_outputs(outputs: list[dict]) -> tuple[float, HeadStats | None]:
    """Mean loss over micro-batches and data-parallel ranks; per-head stats summed (last stage only)."""
    if not outputs:  # not the last pipeline stage
        return float("nan"), None
    loss = torch.stack([o["loss"] for o in outputs]).mean()
    stats = HeadStats.total([o["stats"] for o in outputs]).packed()
    dp = parallel_state.get_data_parallel_group()
    if torch.distributed.get_world_size(dp) > 1:
        packed = torch.cat([loss.view(1), stats.flatten()])
        torch.distributed.all_reduce(packed, group=dp)
        loss = packed[0] / torch.distributed.get_world_size(dp)
        stats = packed[1:].view_as(stats)
    return float(loss), HeadStats.unpacked(stats)


def take(batches: Iterable[Batch], num_microbatches: int) -> list[Batch]:
    """The step's micro-batches, read up front (small token and mask tensors): their valid targets are
    counted before the first forward (:func:`step_normalization`)."""
    taken = list(itertools.islice(batches, num_microbatches))
    if len(taken) != num_microbatches:
        raise ValueError(f"{len(taken)} micro-batches for a step of {num_microbatches}")
    return taken


@contextlib.contextmanager
def step_normalization(
    models: Sequence[torch.nn.Module], batches: Sequence[Batch], seq_len: int
) -> Iterator[None]:
    """For the duration of one step: hand the loss of this rank's last stage (``mtp.loss_normalization=global``)
    the step's per-head valid-target counts over all micro-batches and DP ranks (:class:`StepCounts`).

    One all-reduce of n integers over the data-parallel group, on the last pipeline stage only: its DP peers are
    last-stage ranks too, and every rank holds its micro-batches, so no pipeline communication is needed.
    The engines average ``len(batches) x dp`` micro-batch losses into the gradient (see StepCounts).
    """
    losses = [loss for loss in mtp_losses(models) if loss.normalization == "global"]
    if not losses:  # not the last stage, or micro_batch normalization
        yield
        return
    counts = valid_counts(batches, seq_len).to(compat.device())
    dp = parallel_state.get_data_parallel_group()
    if torch.distributed.get_world_size(dp) > 1:
        torch.distributed.all_reduce(counts, group=dp)
    step = StepCounts(tuple(counts.tolist()), len(batches) * torch.distributed.get_world_size(dp))
    for loss in losses:
        loss.step_counts = step
    try:
        yield
    finally:  # a forward outside a step (tests, tools) is its own step again
        for loss in losses:
            loss.step_counts = None
