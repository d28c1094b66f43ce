"""Every random stream of a rank (python, numpy, torch CPU/CUDA, megatron's tracker): seeded from the run's
seed, and captured / restored as tensors and lists for the rank's checkpoint file.

Kept to types `torch.load(weights_only=True)` accepts, so loading a checkpoint never unpickles code.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from megatron.core import tensor_parallel


def seed_streams(seed: int) -> None:
    """Start python's and numpy's global generators and megatron's tracker (its data-, model- and
    expert-parallel streams, offset per rank as megatron does) from the run's seed: a fresh process would
    otherwise seed python and numpy from OS entropy, so two runs of one config would save different states.
    torch's global generator is its owner's to seed (the trainer does, before building the model); tools that
    start a world keep torch's fixed default."""
    random.seed(seed)
    np.random.seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGState:
    """This rank's random streams as a stateful part of a checkpoint (stored per rank)."""

    def state_dict(self) -> dict[str, Any]:
        return get_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


@dataclass
class RandomState:
    """The streams a forward draws dropout from (torch's CPU and CUDA generators, megatron's tracker), captured
    so that the forward can run again with the same draws: the chained MTP heads' re-run in the loss."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    tracker: dict

    @classmethod
    def capture(cls) -> RandomState:
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        return cls(torch.get_rng_state(), cuda, tensor_parallel.get_cuda_rng_tracker().get_states())

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the block from this state, then put the streams back where they were."""
        now = RandomState.capture()
        self._set()
        try:
            yield
        finally:
            now._set()

    def _set(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        tensor_parallel.get_cuda_rng_tracker().set_states(self.tracker)
