"""Process groups: torch.distributed start-up, megatron parallel_state, and the one Layout every module asks.

Backend is NCCL when CUDA is present, else gloo. A plain `python -m mtp_pretrain.cli` (no torchrun) runs
as a world of one on a local TCP store, so single-process runs and tests use the same code path.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mtp_pretrain import compat, determinism


@dataclass(frozen=True)
class Layout:
    """Tensor × pipeline (× virtual pipeline) × data parallel sizes of this job; validated once, asked by
    everyone else."""

    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # model chunks per pipeline rank (interleaved schedule); None = one

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"parallel.tp={self.tp} and parallel.pp={self.pp} must be >= 1")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by parallel.tp*parallel.pp="
                f"{self.tp * self.pp}: launch a multiple of tp*pp processes or change tp/pp"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    tp: int = 1, pp: int = 1, seed: int = 0, timeout_min: int = 30, vpp: int | None = None
) -> Layout:
    """Start torch.distributed (env:// under torchrun, a private world of one otherwise) and megatron groups."""
    from megatron.core import parallel_state

    compat.apply()
    determinism.warm_up_vml()  # before any parallel region: see there
    if not dist.is_initialized():
        backend = "nccl" if compat.cuda_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(minutes=timeout_min)
        if "RANK" in os.environ:  # torchrun / srun: env:// rendezvous
            dist.init_process_group(backend, timeout=timeout)
        else:  # plain `python ...`: a private world of one; nothing leaks into child processes' env
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
            )
    layout = Layout(world_size=dist.get_world_size(), tp=tp, pp=pp, vpp=vpp if vpp and vpp > 1 else None)
    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size() != tp
        or parallel_state.get_pipeline_model_parallel_world_size() != pp
        or (parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1) != (vpp or 1)
    ):  # another layout in the same process (tests, tools): rebuild the groups
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        )
    from mtp_pretrain.rng import seed_streams  # imports megatron: not at this module's import

    seed_streams(seed)
    return layout


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_logging_rank() -> bool:
    """The rank that prints and logs: the last pipeline stage of the first TP/DP group holds the losses."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return rank() == 0
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
