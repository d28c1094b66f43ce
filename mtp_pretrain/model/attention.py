"""Core attention backends (``model.attention``): the layer spec of every block, trunk and heads alike.

    local  megatron's DotProductAttention: unfused, materialises the [B, heads, T, T] scores
    sdpa   SDPAttention below: torch's scaled_dot_product_attention (flash / memory-efficient kernels)
    te     megatron's Transformer Engine spec (needs transformer_engine)
    auto   te where transformer_engine imports, else sdpa

local and sdpa differ only in the core attention, which holds no weights: their checkpoints are the same
tensors under the same keys, and one loads into the other.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from mtp_pretrain.config import ATTENTION_BACKENDS, TE_MISSING, ConfigError

# torch >= 2.5 broadcasts K/V groups inside the kernel; before, they are repeated as megatron does
_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class SDPAttention(MegatronModule):
    """Causal self-attention through F.scaled_dot_product_attention; DotProductAttention's constructor and
    forward: query [sq, b, heads/tp, hd], key/value [sk, b, groups/tp, hd] -> context [sq, b, heads/tp * hd]
    of this tensor-parallel rank's heads."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        unsupported = {
            "context_parallel_size > 1": config.context_parallel_size != 1,
            f"softmax_type={config.softmax_type}": config.softmax_type != "vanilla",
            "window_size (sliding-window attention)": config.window_size is not None,
            f"attn_mask_type={attn_mask_type.name}": attn_mask_type != AttnMaskType.causal,
        }
        bad = [name for name, hit in unsupported.items() if hit]
        if bad:
            raise ValueError(f"SDPAttention (model.attention=sdpa) does not support {', '.join(bad)}")
        self.layer_number = max(1, layer_number)
        if pg_collection is None:  # as DotProductAttention: SelfAttention passes its own
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        # megatron's scale (apply_query_key_layer_scaling divides it by the layer number, then its softmax
        # multiplies the scores back by the same factor: the product is this)
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError(
                "SDPAttention (model.attention=sdpa) computes the causal mask only: it takes no attention_mask, "
                "attention_bias or packed sequences (use model.attention=local or te)"
            )
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(f"SDPAttention takes attn_mask_type=causal only, got {attn_mask_type.name}")
        if query.shape[0] != key.shape[0]:  # SDPA aligns its causal mask top-left, megatron bottom-right
            raise ValueError(
                f"SDPAttention needs as many queries as keys (got {query.shape[0]}, {key.shape[0]})"
            )
        sq, b = query.shape[:2]
        # [s, b, heads, hd] -> [b, heads, s, hd]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        repeat = self.heads_per_partition // self.groups_per_partition
        gqa: dict = {}
        if repeat > 1 and _HAS_ENABLE_GQA:
            gqa["enable_gqa"] = True
        elif repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0
        # dropout draws from the model-parallel RNG stream, as megatron's DotProductAttention does
        fork = dropout_p > 0 and not self.config.sequence_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork() if fork else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.softmax_scale, **gqa
            )
        # [b, heads, sq, hd] -> [sq, b, heads * hd]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)


def te_available() -> bool:
    """Whether ``import transformer_engine`` works (an installed build can still fail at import)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(attention: str) -> str:
    """``model.attention`` -> the backend it runs: auto becomes te or sdpa; te without TE is a ConfigError."""
    if attention not in ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention={attention!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    if attention == "auto":
        return "te" if te_available() else "sdpa"
    if attention == "te" and not te_available():
        raise ConfigError(TE_MISSING)
    return attention


def layer_spec(attention: str) -> ModuleSpec:
    """The block spec of ``model.attention``: megatron's local Llama spec (RMSNorm), its core attention
    swapped for SDPAttention under sdpa, or megatron's Transformer Engine spec under te."""
    backend = resolve_backend(attention)
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if backend == "sdpa":
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
