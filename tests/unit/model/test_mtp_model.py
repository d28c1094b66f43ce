"""Model structure: n=1 is exactly megatron's plain GPT decoder; causality; stage layout; sharded keys."""

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from mtp_pretrain.build import build_model
from mtp_pretrain.config import ModelConfig, MTPConfig
from mtp_pretrain.model.mtp_model import transformer_config
from mtp_pretrain.model.vocab import padded_vocab_size
from tests.numerics import EPS32, assert_within_ulps

VOCAB = 256


def _plain_gpt_key(key: str, trunk_layers: int) -> str:
    """Our n=1 state-dict key -> the same weight's key in an L-layer GPTModel."""
    if key.startswith("heads.layers.0."):
        return key.replace("heads.layers.0.", f"decoder.layers.{trunk_layers}.")
    return key.replace("heads.final_layernorm.", "decoder.final_layernorm.")


def test_n1_is_a_plain_L_layer_decoder(dist_world, tiny_model_cfg: ModelConfig):
    torch.manual_seed(0)
    mtp = MTPConfig(n=1)
    # like with like: megatron's local spec on both sides (sdpa vs local: tests/unit/model/test_attention.py)
    tiny_model_cfg = dataclasses.replace(tiny_model_cfg, attention="local")
    ours = build_model(tiny_model_cfg, mtp, VOCAB, transformer_config(tiny_model_cfg, mtp))
    # megatron's own GPT with all L layers in its decoder and the same Llama settings
    gpt_cfg = transformer_config(tiny_model_cfg, MTPConfig(n=1))
    gpt_cfg.num_layers = tiny_model_cfg.num_layers
    gpt = GPTModel(
        gpt_cfg,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=tiny_model_cfg.seq_len,
        position_embedding_type="rope",
    )
    ours_sd = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    mapped = {_plain_gpt_key(k, tiny_model_cfg.num_layers - 1): v for k, v in ours_sd.items()}
    gpt_sd = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    assert set(mapped) == set(gpt_sd), set(mapped) ^ set(gpt_sd)
    gpt.load_state_dict(mapped, strict=False)

    tokens = torch.randint(0, VOCAB, (2, tiny_model_cfg.seq_len + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    logits_gpt = gpt(inputs, positions, attention_mask=None)  # [B, T, V]
    plain_loss = F.cross_entropy(logits_gpt.reshape(-1, VOCAB), labels.reshape(-1))
    loss, _ = ours(tokens)
    # the same logits (below), CE by our loss vs F.cross_entropy: another order of the sums over 256 ids and
    # 48 positions, a few ulps of the loss (measured <= 0.7); 16 as in tests/unit/test_loss.py
    torch.testing.assert_close(loss, plain_loss, rtol=16 * EPS32, atol=0)
    # the same modules on the same inputs: bit-identical here (AVX-512, AVX2 and scalar kernels); 64 ulps of
    # the logits' largest magnitude leave room for a GEMM that takes another path per call on other CPUs
    assert_within_ulps(ours.head_logits(inputs)[0].transpose(0, 1), logits_gpt, 64, name="logits")


def test_heads_are_causal(dist_world, tiny_model_cfg: ModelConfig):
    torch.manual_seed(0)
    mtp = MTPConfig(n=3)
    model = build_model(tiny_model_cfg, mtp, VOCAB, transformer_config(tiny_model_cfg, mtp))
    tokens = torch.randint(0, VOCAB, (1, tiny_model_cfg.seq_len))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % VOCAB
    for a, b in zip(model.head_logits(tokens), model.head_logits(changed), strict=True):
        # positions < 10 see the same tokens through the same kernels, masked keys add exact zeros: measured
        # equal; the default fp32 tolerance (1.3e-6 relative + 1e-5) only allows another summation order
        torch.testing.assert_close(a[:10], b[:10])
        assert not torch.allclose(a[10:], b[10:])  # other tokens: changes far beyond rounding


def test_block_count_is_L_for_every_n(dist_world, tiny_model_cfg: ModelConfig):
    counts = {}
    for n in (1, 2, 4):
        mtp = MTPConfig(n=n)
        model = build_model(tiny_model_cfg, mtp, VOCAB, transformer_config(tiny_model_cfg, mtp))
        counts[n] = (len(model.decoder.layers), model.heads.n)
        numbers = [layer.layer_number for layer in model.decoder.layers] + [
            layer.layer_number for layer in model.heads.layers
        ]
        assert numbers == list(range(1, tiny_model_cfg.num_layers + 1))
    assert counts == {1: (4, 1), 2: (3, 2), 4: (1, 4)}


def test_sharded_state_dict_covers_every_weight(dist_world, tiny_model_cfg: ModelConfig):
    mtp = MTPConfig(n=2)
    model = build_model(tiny_model_cfg, mtp, VOCAB, transformer_config(tiny_model_cfg, mtp))
    sharded = model.sharded_state_dict()
    plain = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert plain <= set(sharded), plain - set(sharded)
    assert sharded["heads.layers.1.mlp.linear_fc1.weight"].key == "heads.layers.1.mlp.linear_fc1.weight"


def test_padded_vocab_size():
    assert padded_vocab_size(4096, 1) == 4096
    assert padded_vocab_size(4097, 2) == 4352
