"""The bench model: the shape options' trunk + n heads, trained one step by the engine."""

import argparse
import math

import torch

from mtp_pretrain.bench.models import bench_model, random_step, shape_config
from mtp_pretrain.config import OptimConfig
from mtp_pretrain.engine.megatron import MegatronEngine

ARGS = argparse.Namespace(hidden=32, heads=2, trunk_layers=1, seq=16, batch=2, vocab=256, attention="auto")


def test_shape_config():
    cfg = shape_config(ARGS, 5)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.seq_len) == (5, 32, 2, 16)


def test_bench_model_is_the_trunk_plus_n_heads_and_trains(dist_world):
    torch.manual_seed(0)
    cfg, mtp, tconf, model = bench_model(ARGS, 2, chunk_size=8)
    assert cfg.num_layers == ARGS.trunk_layers + 2 and mtp.n == 2 and mtp.chunk_size == 8
    assert tconf.hidden_size == ARGS.hidden
    engine = MegatronEngine(model, tconf, OptimConfig(warmup_steps=0), 10)
    result = random_step(engine, ARGS, ARGS.seq + 2, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(result.loss) and result.head_stats.n == 2
