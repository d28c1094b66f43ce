"""FLOPs per trained token from the model shape (checked against a built model) and the device peak."""

import math
from dataclasses import replace

import pytest
import torch

from mtp_pretrain import flops
from mtp_pretrain.build import build_model
from mtp_pretrain.config import ModelConfig, MTPConfig, ffn_hidden_size
from mtp_pretrain.flops import block_params, mfu, model_params, peak_flops, train_flops_per_token
from mtp_pretrain.model.mtp_model import transformer_config

SMALL = ModelConfig(preset="t", num_layers=5, hidden_size=64, num_attention_heads=4, seq_len=32)


def test_ffn_default_is_8_3_d_rounded_up_to_64():
    assert ffn_hidden_size(SMALL) == 192  # 8*64/3 = 170.7 -> 192
    assert ffn_hidden_size(replace(SMALL, ffn_hidden_size=100)) == 100


def test_block_params_hand_count():
    # d=64, 4 heads of 16, 2 KV groups, SwiGLU ffn 96: q + k + v + o + (gate, up, down)
    m = replace(SMALL, num_query_groups=2, ffn_hidden_size=96)
    q, k, v, o = 64 * 64, 64 * 32, 64 * 32, 64 * 64
    mlp = 64 * 96 * 2 + 96 * 64
    assert block_params(m) == q + k + v + o + mlp == 30720
    # multi-head attention: K and V are full width
    assert block_params(replace(m, num_query_groups=None)) == 4 * 64 * 64 + mlp


@pytest.mark.parametrize("groups", [None, 2])
def test_block_params_match_a_megatron_layer(dist_world, groups):
    m = replace(SMALL, num_query_groups=groups)
    model = build_model(m, MTPConfig(n=1), 256, transformer_config(m, MTPConfig(n=1)))
    layer = model.decoder.layers[0]
    weights = sum(p.numel() for name, p in layer.named_parameters() if "layernorm" not in name)
    assert weights == block_params(m)


def test_matmul_weights_match_the_built_model(dist_world):
    """6 x (every matmul weight touched per token) + attention: the heads share one unembedding, used n times."""
    vocab, n = 256, 3
    model = build_model(SMALL, MTPConfig(n=n), vocab, transformer_config(SMALL, MTPConfig(n=n)))
    params = dict(model.named_parameters())
    matmul = sum(
        p.numel() for name, p in params.items() if "embedding" not in name and "layernorm" not in name
    )
    # L blocks (trunk + heads) and one shared unembedding
    assert matmul == SMALL.num_layers * block_params(SMALL) + vocab * SMALL.hidden_size
    attention = 12 * SMALL.num_layers * SMALL.seq_len * SMALL.hidden_size  # QK^T + AV, fwd + bwd
    expected = 6 * (matmul + (n - 1) * vocab * SMALL.hidden_size) + attention
    assert train_flops_per_token(SMALL, n, vocab) == expected


def test_more_heads_cost_only_the_extra_unembeddings():
    vocab = 32000
    m = replace(SMALL, num_layers=8)
    f1, f4 = train_flops_per_token(m, 1, vocab), train_flops_per_token(m, 4, vocab)
    assert f4 - f1 == 6 * 3 * vocab * m.hidden_size
    assert f1 < train_flops_per_token(m, 2, vocab) < f4


def test_attention_term_is_linear_in_sequence_length():
    f = {t: train_flops_per_token(replace(SMALL, seq_len=t), 1, 256) for t in (32, 64)}
    assert f[64] - f[32] == 12 * SMALL.num_layers * 32 * SMALL.hidden_size


def test_peak_flops_on_this_machine_is_positive():
    peak = peak_flops()
    assert isinstance(peak, float) and math.isfinite(peak) and peak > 0


@pytest.mark.parametrize(
    ("name", "bf16", "fp32"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12, 494.5e12),
        ("NVIDIA H200", 989e12, 494.5e12),
        ("NVIDIA A100-SXM4-80GB", 312e12, 156e12),
        ("NVIDIA A10G", 125e12, 62.5e12),
        ("Some Future GPU", 100e12, 100e12),
    ],
)
def test_peak_flops_gpu_table(monkeypatch, name, bf16, fp32):
    monkeypatch.setattr(flops.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda *a: name)
    assert peak_flops(torch.bfloat16) == bf16
    assert peak_flops(torch.float32) == fp32


@pytest.mark.parametrize("tied", [False, True])
def test_model_params_match_the_built_model(dist_world, tied):
    """Every weight but the norms: L blocks + embedding + unembedding (one matrix when tied); the vocabulary
    is a multiple of 128, so megatron's padding adds nothing."""
    m = replace(SMALL, tie_embeddings=tied)
    vocab, mtp = 256, MTPConfig(n=2)
    model = build_model(m, mtp, vocab, transformer_config(m, mtp))
    weights = sum(p.numel() for name, p in model.named_parameters() if "layernorm" not in name)
    assert weights == model_params(m, vocab)


def test_mfu_is_model_flops_done_over_the_peak():
    assert mfu(tokens_per_s=1000.0, flops_per_token=2e9, peak_flops_total=4e12) == 0.5
