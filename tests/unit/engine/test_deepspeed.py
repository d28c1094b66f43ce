"""The DeepSpeed engine's pieces that run in one process: generated config, the no-compile shim, offload."""

import json
import sys

import torch

from mtp_pretrain import compat
from mtp_pretrain.build import build_model
from mtp_pretrain.config import ModelConfig, MTPConfig, OptimConfig, ParallelConfig
from mtp_pretrain.engine.deepspeed import DeepSpeedEngine, deepspeed_config
from mtp_pretrain.model.mtp_model import transformer_config
from tests.conftest import compose_config


def test_generated_config_sets_clipping_zero_offload_and_merges_raw_json(dist_world, tmp_path):
    p = ParallelConfig(engine="deepspeed", zero_stage=3, offload_optimizer=True, offload_params=True)
    cfg = deepspeed_config(p, OptimConfig(clip_grad=0.0), micro_batch=4, grad_accum=3, bf16=True)
    assert cfg["gradient_clipping"] == 0.0  # not DeepSpeed's default 1.0
    assert (
        cfg["train_batch_size"] == 12 and cfg["gradient_accumulation_steps"] == 3 and cfg["bf16"]["enabled"]
    )
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}))
    merged = deepspeed_config(
        ParallelConfig(engine="deepspeed", zero_stage=1, deepspeed_config=str(raw)),
        OptimConfig(),
        4,
        1,
        False,
    )
    assert (
        merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
        and merged["steps_per_print"] == 5
    )


def test_the_shared_memory_op_is_never_compiled_on_cpu():
    compat.apply_deepspeed()
    if not torch.cuda.is_available():
        assert sys.modules["deepspeed.comm.torch"].build_shm_op() is None


def test_optimizer_offload_trains_with_torch_adamw(dist_world):
    cfg = ModelConfig(preset="t", num_layers=3, hidden_size=32, num_attention_heads=2, seq_len=8)
    mtp = MTPConfig(n=2)
    model = build_model(cfg, mtp, 256, transformer_config(cfg, mtp))
    before = [p.detach().clone() for p in model.parameters()]
    p = ParallelConfig(engine="deepspeed", zero_stage=2, offload_optimizer=True)
    engine = DeepSpeedEngine(model, OptimConfig(warmup_steps=0, lr=1e-2), 10, p, micro_batch=2, grad_accum=1)
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        result = engine.train_step(iter([(tokens, torch.ones_like(tokens, dtype=torch.bool))]), 1, 8, 2)
    assert result.head_stats.packed().shape == (2, 4) and result.grad_norm > 0  # loss, correct, count, joint
    # AdamW steps of ~lr=1e-2 per entry: far beyond rounding, any exact difference shows the update
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters(), strict=True))


def test_preset_composes():
    cfg = compose_config("parallel=deepspeed")
    assert cfg.parallel.engine == "deepspeed" and cfg.parallel.zero_stage == 2
