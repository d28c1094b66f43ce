"""The n multi-token-prediction heads (last pipeline stage), in five published designs (``mtp.head_type``).

Head k (1-based) turns what it reads into a hidden state y_k whose unembedding (shared, on the model)
predicts token t+k. Head 1 is the next-token head in every design: one transformer block, then the shared
final norm, so n=1 is a plain Llama and head 1 exports as its last layer. The designs differ in heads 2..n
and in what each head reads (h = the trunk output, o_k = head k's block output before the norm):

    parallel    head k = block_k(h)                                   Gloeckle et al. 2024 (their default)
    linear      head k = W_k h, one d x d linear (k >= 2)             Gloeckle et al. 2024, Table S4
    causal      head k = block_k(o_{k-1}), head 1 = block_1(h)        Gloeckle et al. 2024, Table S4
    anticausal  head n = block_n(h), head k = block_k(o_{k+1})        Gloeckle et al. 2024, Table S4
    sequential  head k = final_norm_k(block_k(eh_proj([enorm(e_{t+k-1}); hnorm(y_{k-1})])))   DeepSeek-V3

y_k = final_norm(o_k) with the shared norm, except for sequential heads 2..n, which own a final norm each
and pass their normed output y_k on (megatron-core's MultiTokenPredictionLayer, whose submodule names
``enorm``, ``hnorm``, ``eh_proj``, ``transformer_layer``, ``final_layernorm`` these heads keep, so weights
copy over one to one; e_j is the trunk's embedding of token j). The chained designs are what the loss has
to carry a gradient along (loss.py): :meth:`MTPHeads.source` says which head's carry a head reads and
:attr:`MTPHeads.order` the order they run in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default
from torch import Tensor

from mtp_pretrain.model.vocab import vocab_parallel_embedding

CHAINED = ("causal", "anticausal", "sequential")  # a head reads another head's output


@dataclass
class HeadInputs:
    """What the heads read besides the trunk output h [T, B, d]."""

    rotary: Tensor | None  # the rotary embedding of the T positions
    tokens: Tensor | None = None  # [B, T+n]: sequential head k embeds tokens[:, k-1 : k-1+T]
    embedding: Tensor | None = (
        None  # [V/tp, d] the trunk's word embedding (sequential heads; a copy under PP)
    )


def _norm(config: TransformerConfig) -> torch.nn.Module:
    norm_cls = LocalSpecProvider().layer_norm(rms_norm=config.normalization == "RMSNorm")
    return build_module(norm_cls, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)


class SequentialHead(MegatronModule):
    """One DeepSeek-V3 MTP module as megatron-core builds it (MultiTokenPredictionLayer, local spec, no
    sequence parallelism): [enorm(embedding); hnorm(previous head's output)] -> eh_proj (2d -> d) -> one
    transformer block -> its own final norm."""

    def __init__(
        self, config: TransformerConfig, layer_spec: ModuleSpec, layer_number: int, vp_stage: int | None
    ) -> None:
        super().__init__(config=config)
        self.enorm, self.hnorm = _norm(config), _norm(config)
        self.eh_proj = tensor_parallel.ColumnParallelLinear(
            2 * config.hidden_size,
            config.hidden_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
        )
        self.transformer_layer = build_module(
            layer_spec, config=config, layer_number=layer_number, vp_stage=vp_stage
        )
        self.final_layernorm = _norm(config)

    def forward(self, previous: Tensor, embedded: Tensor, rotary: Tensor | None) -> Tensor:
        """previous: head k-1's normed output [T, B, d]; embedded: the embedding of token t+k-1 [T, B, d]."""
        x, _ = self.eh_proj(torch.cat((self.enorm(embedded), self.hnorm(previous)), -1))
        # megatron gathers the column-parallel halves itself (MultiTokenPredictionLayer._concat_embeddings)
        x = gather_from_tensor_model_parallel_region(x)
        out, _ = self.transformer_layer(x, attention_mask=None, rotary_pos_emb=rotary)
        return self.final_layernorm(out)


class MTPHeads(MegatronModule):
    """n heads of one ``head_type`` + the shared final norm (last pipeline stage only)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        n: int,
        first_layer_number: int,
        vp_stage: int | None = None,
        head_type: str = "parallel",
    ) -> None:
        super().__init__(config=config)
        self.head_type = head_type

        def head(i: int) -> torch.nn.Module:
            # Layer numbers continue the trunk's (megatron adds this stage's offset), so every block of the
            # model has a distinct number: L-n+1 .. L for the heads, as in a plain L-layer decoder.
            number = first_layer_number + i
            if i > 0 and head_type == "linear":
                return tensor_parallel.ColumnParallelLinear(
                    config.hidden_size,
                    config.hidden_size,
                    config=config,
                    init_method=config.init_method,
                    gather_output=True,
                    bias=False,
                    skip_bias_add=False,
                )
            if i > 0 and head_type == "sequential":
                return SequentialHead(config, layer_spec, number, vp_stage)
            return build_module(layer_spec, config=config, layer_number=number, vp_stage=vp_stage)

        self.layers = torch.nn.ModuleList(head(i) for i in range(n))
        self.final_layernorm = _norm(config)

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def chained(self) -> bool:
        return self.head_type in CHAINED and self.n > 1

    @property
    def order(self) -> list[int]:
        """The (0-based) heads in the order they run: every head after the one it reads."""
        return list(range(self.n))[::-1] if self.head_type == "anticausal" else list(range(self.n))

    def source(self, i: int) -> int | None:
        """The head whose carry head i (0-based) reads; None: the trunk output h."""
        if self.head_type in ("causal", "sequential"):
            return i - 1 if i > 0 else None
        if self.head_type == "anticausal":
            return i + 1 if i < self.n - 1 else None
        return None

    def forward_head(self, i: int, x: Tensor, inputs: HeadInputs) -> tuple[Tensor, Tensor]:
        """Head i (0-based) on what it reads, x [T, B, d] -> (normed hidden y [T, B, d] for the unembedding,
        the carry [T, B, d] that the head reading this one gets: y for sequential, else the block output)."""
        layer = self.layers[i]
        if isinstance(layer, SequentialHead):
            seq_len = x.shape[0]
            ids = inputs.tokens[:, i : i + seq_len]  # token t+k-1 for head k = i+1
            embedded = vocab_parallel_embedding(ids, inputs.embedding).transpose(0, 1)
            # the trunk's embedding module drops out its output (megatron's MTP calls that module)
            embedded = F.dropout(embedded, p=self.config.hidden_dropout, training=self.training)
            y = layer(x, embedded, inputs.rotary)
            return y, y
        if isinstance(layer, tensor_parallel.ColumnParallelLinear):
            out, _ = layer(x)
        else:
            out, _ = layer(x, attention_mask=None, rotary_pos_emb=inputs.rotary)
        y = self.final_layernorm(out)
        return y, (y if self.head_type == "sequential" else out)

    def run(self, h: Tensor, inputs: HeadInputs, heads: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """(i, y_i) of heads 0..heads-1 (default all) in :attr:`order` on trunk output h, each computed once
        (the chain's carries are kept until read); the heads they read run too (anticausal: all of them), but
        only the asked-for ones are yielded."""
        want = set(range(self.n if heads is None else heads))
        carries: dict[int, Tensor] = {}
        for i in self.order:
            if not want:
                return
            src = self.source(i)
            y, carries[i] = self.forward_head(i, h if src is None else carries.pop(src), inputs)
            if i in want:
                want.discard(i)
                yield i, y

    def head_parameters(self, i: int, inputs: HeadInputs) -> list[torch.nn.Parameter]:
        """Parameters head i's forward touches besides the unembedding: its module, the shared norm where it
        uses it, the word embedding where it reads one."""
        own = list(self.layers[i].parameters())
        if isinstance(self.layers[i], SequentialHead):
            return own + [inputs.embedding]
        return own + list(self.final_layernorm.parameters())

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        # A ModuleList is not a MegatronModule: without this its TP-split weights would be saved as replicated.
        sd = {}
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for i, layer in enumerate(self.layers):
            if isinstance(layer, MegatronModule):
                sd.update(layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata))
            else:  # tp_group explicitly: megatron only defaults it when no dp group is given either
                sd.update(
                    sharded_state_dict_default(
                        layer, f"{prefix}layers.{i}.", sharded_offsets, metadata, tp_group=tp_group
                    )
                )
        sd.update(
            sharded_state_dict_default(
                self.final_layernorm,
                f"{prefix}final_layernorm.",
                sharded_offsets,
                metadata,
                tp_group=tp_group,
            )
        )
        return sd
