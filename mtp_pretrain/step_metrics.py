"""What the trainer reports after each optimizer step: per-head loss and accuracy, learning rate, gradient
norm, throughput, MFU, memory, and the run's counters (steps dropped as non-finite, data skipped)."""

from __future__ import annotations

from collections.abc import Sequence

import psutil
import torch
from megatron.core import parallel_state

from mtp_pretrain import weight_schedule
from mtp_pretrain.config import Config
from mtp_pretrain.data.loader import BatchLoader
from mtp_pretrain.data.shard_reader import ERROR_KINDS
from mtp_pretrain.engine.base import StepResult
from mtp_pretrain.flops import mfu, peak_flops, train_flops_per_token
from mtp_pretrain.parallel import Layout


def memory_gb() -> float:
    """Peak GPU memory allocated (CUDA), else this process's resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class StepMetrics:
    def __init__(self, cfg: Config, layout: Layout, vocab_size: int, loader: BatchLoader) -> None:
        t = cfg.trainer
        self.tokens_per_step = t.micro_batch_size * cfg.model.seq_len * t.grad_accum * layout.dp
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.mtp.n, vocab_size)
        self.peak = peak_flops(torch.bfloat16 if t.bf16 else torch.float32) * layout.world_size
        self.loader = loader

    def of_step(
        self,
        result: StepResult,
        seconds: float,
        nonfinite_steps: int,
        weights: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """The step's metrics; only the counters off the last pipeline stage (it alone holds the losses).
        ``weights``: the heads' loss weights of the step (mtp.weight_schedule), logged as ``mtp_weight_k``."""
        m: dict[str, float] = {"nonfinite_steps": nonfinite_steps}
        if result.head_stats is None:
            return m
        tokens_per_s = self.tokens_per_step / seconds
        return {
            "loss": result.loss,
            **result.head_stats.metrics(),
            **m,
            **(weight_schedule.metrics(weights) if weights is not None else {}),
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak),
            "mem_gb": memory_gb(),
        }

    def data_errors(self) -> dict[str, float]:
        """Shards/samples skipped so far, summed over the data-parallel ranks (a collective: call on all)."""
        counts = torch.tensor([self.loader.errors[k] for k in ERROR_KINDS], dtype=torch.float64)
        group = parallel_state.get_data_parallel_group()
        if torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(counts, group=group)
        return {f"data/{k}": float(v) for k, v in zip(ERROR_KINDS, counts.tolist(), strict=True)}
