"""Shared fixtures: one private world-of-one process group per pytest process (gloo on CPU), corpora, and
one small trained n=4 model for the inference tests and tools."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from mtp_pretrain import parallel
from mtp_pretrain.config import Config, ModelConfig, MTPConfig, compose_train_config

if TYPE_CHECKING:  # imported lazily below: the trainer pulls in megatron
    from mtp_pretrain.inference.weights import LoadedModel
    from mtp_pretrain.trainer import Trainer


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


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory):
    """A small deterministic tree of Python files standing in for a corpus (fast to tokenize)."""
    root = tmp_path_factory.mktemp("src")
    for i in range(40):
        body = "\n".join(
            f"def f_{i}_{j}(x, y={j}):\n    '''Return x scaled by {j}.'''\n    return x * y + {i}\n"
            for j in range(6)
        )
        (root / f"mod_{i:03d}.py").write_text(f"import os\n\n{body}\n")
    return root


def compose_config(*overrides: str) -> Config:
    """The real Hydra config (conf/train.yaml) with overrides, as the CLI builds it."""
    return compose_train_config(overrides)


def tiny_run_overrides(source, cache, run_dir, **extra) -> list[str]:
    """A seconds-long training run on the synthetic corpus."""
    base = {
        "model.num_layers": 3,
        "model.hidden_size": 32,
        "model.num_attention_heads": 2,
        "model.seq_len": 16,
        "mtp.n": 2,
        "data.source": f"[{source}]",
        "data.cache_dir": str(cache),
        "data.vocab_size": 300,
        "data.docs_per_shard": 5,
        "trainer.micro_batch_size": 2,
        "trainer.steps": 6,
        "trainer.val_every": 3,
        "trainer.val_batches": 2,
        "trainer.save_every": 3,
        "trainer.run_dir": str(run_dir),
        "logging.wandb_mode": "disabled",
        "logging.log_every": 1,
        "optim.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@dataclass
class TrainedRun:
    trainer: Trainer
    checkpoint: Path
    loaded: LoadedModel


@pytest.fixture(scope="session")
def mtp_run(dist_world, synthetic_source, tmp_path_factory) -> TrainedRun:
    """L=5 (trunk 1 + 4 heads), GQA 4:2, trained on the synthetic corpus long enough that the extra heads
    draft well (its code is repetitive), so decoding meets accepted and rejected drafts alike."""
    tmp = tmp_path_factory.mktemp("mtp_run")
    overrides = tiny_run_overrides(
        synthetic_source,
        tmp / "cache",
        tmp / "run",
        **{
            "model.num_layers": 5,
            "model.hidden_size": 64,
            "model.num_attention_heads": 4,
            "model.num_query_groups": 2,
            "model.seq_len": 48,
            "mtp.n": 4,
            "trainer.steps": 60,
            "trainer.micro_batch_size": 8,
            "trainer.val_every": 60,
            "trainer.save_every": 60,
            "optim.warmup_steps": 5,
            "data.mask_doc_boundaries": "true",
        },
    )
    from mtp_pretrain.inference.weights import load_model
    from mtp_pretrain.trainer import Trainer

    trainer = Trainer(compose_config(*overrides))
    result = trainer.fit()
    return TrainedRun(trainer, result.checkpoint, load_model(result.checkpoint))


def _train_head_type(head_type: str, source, root) -> TrainedRun:  # noqa: ANN001 - paths
    from mtp_pretrain.inference.weights import load_model
    from mtp_pretrain.trainer import Trainer

    overrides = tiny_run_overrides(
        source,
        root / "cache",  # shared: the tokenizer and shards are made once for all types
        root / head_type,
        **{
            # trunk of 1 and 3 heads (chains of three: sequential drafting redoes n-2 = 1 extra position),
            # GQA 2:1; 8 steps: a few seconds, and heads 2..3 already draft a right token now and then
            "model.num_layers": 4,
            "model.num_query_groups": 1,
            "model.seq_len": 32,
            "mtp.n": 3,
            "mtp.head_type": head_type,
            "trainer.steps": 8,
            "trainer.micro_batch_size": 8,
            "trainer.val_every": 8,
            "trainer.val_batches": 1,
            "trainer.save_every": 8,
        },
    )
    trainer = Trainer(compose_config(*overrides))
    result = trainer.fit()
    return TrainedRun(trainer, result.checkpoint, load_model(result.checkpoint))


@pytest.fixture(scope="session")
def head_type_run(dist_world, synthetic_source, tmp_path_factory) -> Callable[[str], TrainedRun]:
    """``head_type_run(t)``: a tiny briefly trained model of ``mtp.head_type`` t (trained on first use, once
    per session; the inference, export and acceptance tests share them)."""
    root = tmp_path_factory.getbasetemp() / "head_types"

    runs: dict[str, TrainedRun] = {}

    def run(head_type: str) -> TrainedRun:
        if head_type not in runs:
            runs[head_type] = _train_head_type(head_type, synthetic_source, root)
        return runs[head_type]

    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test by its folder: ``-m unit`` (single process), ``-m integration`` (subprocesses) or
    ``-m gpu`` (tests/gpu: CUDA only, skipped without it)."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in ("unit", "integration", "gpu"):
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))
