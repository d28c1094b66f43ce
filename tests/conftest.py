"""Shared fixtures: one private world-of-one process group per pytest process (gloo on CPU)."""

import pytest
import torch

from mtp_pretrain import parallel
from mtp_pretrain.config import ModelConfig, MTPConfig


@pytest.fixture(scope="session")
def dist_world():
    """torch.distributed + megatron parallel_state for a single process; torn down at the end."""
    layout = parallel.init_distributed(tp=1, pp=1, seed=0)
    yield layout
    parallel.destroy_distributed()


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(preset="test", num_layers=5, hidden_size=64, num_attention_heads=4, seq_len=24)


def make_mtp(n: int, **kw) -> MTPConfig:
    return MTPConfig(n=n, **kw)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
