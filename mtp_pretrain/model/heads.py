"""The n multi-token-prediction heads: one transformer layer each, then one final norm shared by all.

Head i (1-based) maps the trunk output h[t] to a hidden state whose unembedding predicts token t+i; head 1 is
the next-token head. The shared unembedding lives on the model (megatron's LanguageModule expects
`output_layer` there, which is what ties it to the input embedding across pipeline stages).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default
from torch import Tensor


class MTPHeads(MegatronModule):
    """n independent head layers + the shared final norm (last pipeline stage only)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        n: int,
        first_layer_number: int,
        vp_stage: int | None = None,
    ) -> None:
        super().__init__(config=config)
        # Layer numbers continue the trunk's (megatron adds this stage's offset), so every layer of the
        # model has a distinct number: L-n+1 .. L for the heads, as in a plain L-layer decoder.
        self.layers = torch.nn.ModuleList(
            build_module(layer_spec, config=config, layer_number=first_layer_number + i, vp_stage=vp_stage)
            for i in range(n)
        )
        norm_cls = LocalSpecProvider().layer_norm(rms_norm=config.normalization == "RMSNorm")
        self.final_layernorm = build_module(
            norm_cls, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )

    @property
    def n(self) -> int:
        return len(self.layers)

    def forward_head(self, i: int, h: Tensor, rotary_pos_emb: Tensor | None) -> Tensor:
        """Head i (0-based) on trunk output h [T, B, d] -> normed hidden [T, B, d]."""
        out, _ = self.layers[i](h, attention_mask=None, rotary_pos_emb=rotary_pos_emb)
        return self.final_layernorm(out)

    def head_parameters(self, i: int) -> list[torch.nn.Parameter]:
        """Parameters one head's forward touches besides the unembedding: its layer and the shared norm."""
        return list(self.layers[i].parameters()) + list(self.final_layernorm.parameters())

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        # A ModuleList is not a MegatronModule: without this its TP-split weights would be saved as replicated.
        sd = {}
        for i, layer in enumerate(self.layers):
            sd.update(layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata))
        sd.update(  # tp_group explicitly: megatron only defaults it when no dp group is given either
            sharded_state_dict_default(
                self.final_layernorm,
                f"{prefix}final_layernorm.",
                sharded_offsets,
                metadata,
                tp_group=parallel_state.get_tensor_model_parallel_group(),
            )
        )
        return sd
