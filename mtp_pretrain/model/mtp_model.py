"""The MTP language model as one megatron-core module with pipeline stages.

    tokens [B, T+n] --embedding--> trunk (L-n Llama blocks, split across pipeline stages) --> h [T, B, d]
    h --head i (model/heads.py: mtp.head_type)--> normed hidden --shared unembedding--> logits of token t+i

Stage 0 holds the embedding; the last stage holds the heads, the norm and the unembedding, and returns the
loss of ``loss_fn`` (the model knows its signature, not its maths: mtp_pretrain/build.py passes
loss.MTPLoss). With n=1 this is exactly a plain L-layer decoder (tests/unit/model/test_mtp_model.py
compares it to megatron's GPTModel).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_tp_sharded_tensor_for_checkpoint
from torch import Tensor

from mtp_pretrain import compat
from mtp_pretrain.config import ModelConfig, MTPConfig, ffn_hidden_size
from mtp_pretrain.model.heads import HeadInputs, MTPHeads
from mtp_pretrain.model.vocab import mask_vocab_padding
from mtp_pretrain.targets import HeadStats, HeadTargets


def transformer_config(
    model: ModelConfig,
    mtp: MTPConfig,
    tp: int = 1,
    pp: int = 1,
    bf16: bool = False,
    recompute: bool = False,
    stage_layers: tuple[int | None, int | None] = (None, None),
    vpp: int | None = None,
) -> TransformerConfig:
    """megatron TransformerConfig of the *trunk* (num_layers = L - n); the heads reuse it for their blocks.

    stage_layers: trunk layers on the first and last pipeline stage (None: an even split); vpp: virtual
    pipeline stages (model chunks) per rank for the interleaved schedule.
    """
    dtype = torch.bfloat16 if bf16 else torch.float32
    extra: dict = dict(compat.cpu_safe_config_overrides())
    first, last = stage_layers
    extra.update(num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
    if vpp and vpp > 1:  # interleaved 1F1B: each rank holds vpp model chunks
        extra.update(virtual_pipeline_model_parallel_size=vpp)
    # The MTP loss takes weight gradients with torch.autograd.grad; fused accumulation would write them
    # into main_grad behind its back (and count them twice). Off on every device.
    extra["gradient_accumulation_fusion"] = False
    if recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=model.num_layers - mtp.n,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=ffn_hidden_size(model),
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=model.dropout,
        attention_dropout=model.dropout,
        init_method_std=model.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        **extra,
    )


# (trunk output h [T, B, d], heads, unembed, unembedding weight, targets, head inputs) -> (loss, stats)
LossFn = Callable[
    [Tensor, MTPHeads, Callable[[Tensor], Tensor], torch.nn.Parameter, HeadTargets, HeadInputs],
    tuple[Tensor, HeadStats],
]


class MTPModel(LanguageModule):
    """Trunk stage (+ embedding on stage 0, + MTP heads and shared unembedding on the last stage)."""

    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        n_heads: int,
        seq_len: int,
        pre_process: bool = True,
        post_process: bool = True,
        tie_embeddings: bool = False,
        rotary_base: int = 10000,
        loss_fn: LossFn | None = None,
        layer_spec: ModuleSpec | None = None,
        vp_stage: int | None = None,
        real_vocab_size: int | None = None,
        head_type: str = "parallel",
    ) -> None:
        super().__init__(config=config)
        self.vp_stage = vp_stage  # this chunk's virtual pipeline stage (interleaved schedule), else None
        self.vocab_size, self.n_heads, self.seq_len = vocab_size, n_heads, seq_len
        # ids >= real_vocab_size are padding (vocab_size is padded for TP): their logits are masked out
        self.real_vocab_size = real_vocab_size if real_vocab_size is not None else vocab_size
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = tie_embeddings
        self.loss_fn = (
            loss_fn  # the last stage's loss; None: forward() is not for training (inference, tools)
        )
        self.model_type = ModelType.encoder_or_decoder  # megatron's schedules read it
        # the block spec of every layer, trunk and heads (model/attention.py: model.attention); default local
        spec = layer_spec or get_gpt_layer_local_spec(normalization="RMSNorm")

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=vocab_size,
                max_sequence_length=seq_len,
                position_embedding_type="rope",
            )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
        )
        # The trunk: no final norm here — each head's block comes first, then the shared norm.
        self.decoder = TransformerBlock(
            config=config,
            spec=spec,
            post_layer_norm=False,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        # Sequential heads embed tokens on the last stage. Under PP that stage keeps a copy of the trunk's
        # table (unless the tied output layer is that copy already); megatron keeps it in sync only for tied
        # embeddings or its own MTP, so the copy's gradient all-reduce (sync_embedding_copy_grads) and its
        # checkpoint entry (a replica of the embedding's, sharded_state_dict) are ours.
        self.embedding_copied = (
            head_type == "sequential"
            and n_heads > 1
            and config.pipeline_model_parallel_size > 1
            and not tie_embeddings
        )
        if post_process:
            self.heads = MTPHeads(
                config,
                spec,
                n_heads,
                first_layer_number=len(self.decoder.layers) + 1,
                vp_stage=vp_stage,
                head_type=head_type,
            )
            if self.embedding_copied and not pre_process:
                self.embedding_copy = tensor_parallel.VocabParallelEmbedding(
                    vocab_size, config.hidden_size, init_method=config.init_method, config=config
                )
                # a duplicate: counted once in the gradient norm, reduced over DP in a bucket of its own
                self.embedding_copy.weight.shared = True
                self.embedding_copy.weight.shared_embedding = True
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,  # vocab-parallel logits; the CE reduces across TP
                skip_weight_param_allocation=pre_process and tie_embeddings,
            )
        self.setup_embeddings_and_output_layer()
        if self.embedding_copied and pre_process:  # the original, bucketed as its copy is (see above)
            self.embedding.word_embeddings.weight.shared_embedding = True

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor]) -> None:
        """Pipeline stages > 0 receive the previous stage's activations here (megatron's schedule calls it)."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "MTPModel takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def unembed(self, y: Tensor) -> Tensor:
        """Shared unembedding: hidden [t, B, d] -> vocab-parallel logits [t, B, V/tp]."""
        weight = (
            self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        )
        logits, _ = self.output_layer(y, weight=weight)
        return logits

    def unembedding_weight(self) -> torch.nn.Parameter:
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def token_embedding_weight(self) -> Tensor | None:
        """The word embedding table [V/tp, d] as this stage holds it (sequential heads look tokens up in it)."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.embedding_copied:
            return self.embedding_copy.weight
        return self.output_layer.weight if self.share_embeddings_and_output_weights else None

    def head_inputs(self, tokens: Tensor, rotary: Tensor | None) -> HeadInputs:
        sequential = self.heads.head_type == "sequential"
        return HeadInputs(rotary, tokens, self.token_embedding_weight() if sequential else None)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if hasattr(self, "embedding_copy"):
            # saved as a replica of the trunk's embedding (not written; loaded from it): any PP layout resumes
            del sd[f"{prefix}embedding_copy.weight"]
            sd[f"{prefix}embedding_copy.weight"] = make_tp_sharded_tensor_for_checkpoint(
                tensor=self.embedding_copy.weight,
                key=f"{prefix}embedding.word_embeddings.weight",
                replica_id=(1, 0, parallel_state.get_data_parallel_rank(with_context_parallel=True)),
                allow_shape_mismatch=True,
            )
        return sd

    def trunk(self, input_ids: Tensor | None, seq_len: int) -> tuple[Tensor, Tensor]:
        """Embedding (stage 0) + this stage's trunk layers -> (hidden [T, B, d], rotary embedding)."""
        rotary = self.rotary_pos_emb(seq_len)
        x = self.embedding(input_ids=input_ids, position_ids=None) if self.pre_process else None
        return self.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary), rotary

    def forward(
        self, tokens: Tensor, target_valid: Tensor | None = None, segments: Tensor | None = None
    ) -> Tensor | tuple[Tensor, HeadStats]:
        """tokens [B, T+n]: inputs are the first T, head i's targets are shifted by i. ``target_valid`` masks
        padding; ``segments`` (document numbers) masks targets in another document than their input token.

        Returns this stage's activations, or on the last stage (loss, per-head statistics).
        """
        seq_len = tokens.shape[1] - self.n_heads
        h, rotary = self.trunk(tokens[:, :seq_len] if self.pre_process else None, seq_len)
        if not self.post_process:
            return h
        if self.loss_fn is None:
            raise RuntimeError(
                "MTPModel built without a loss_fn cannot train: build it with mtp_pretrain.build"
            )
        valid = target_valid if target_valid is not None else torch.ones_like(tokens, dtype=torch.bool)
        targets = HeadTargets(tokens, valid, segments)
        inputs = self.head_inputs(tokens, rotary)
        return self.loss_fn(h, self.heads, self.unembed, self.unembedding_weight(), targets, inputs)

    @torch.no_grad()
    def head_logits(self, tokens: Tensor, heads: int | None = None) -> list[Tensor]:
        """Vocab-parallel logits [T, B, V/tp] of the first `heads` heads on inputs tokens [B, T] (one stage).
        Sequential head k reads token t+k-1, past the end for the last k-1 positions: id 0 there, as
        megatron's MTP rolls its inputs in (those positions have no target anyway)."""
        h, rotary = self.trunk(tokens, tokens.shape[1])
        padded = F.pad(tokens, (0, self.n_heads - 1))
        out = dict(self.heads.run(h, self.head_inputs(padded, rotary), heads))
        return [mask_vocab_padding(self.unembed(out[i]), self.real_vocab_size) for i in sorted(out)]


def sync_embedding_copy_grads(chunks: list[torch.nn.Module]) -> None:
    """All-reduce the gradient of the trunk's embedding (first pipeline stage) with that of its copy on the
    last stage (sequential heads, untied, PP > 1), after megatron's own reductions: the two then step alike.
    A no-op for every other model; ``chunks``: this rank's model chunks (DDP-wrapped or not)."""
    models = [getattr(c, "module", c) for c in chunks]
    weights = [
        m.token_embedding_weight()
        for m in models
        if getattr(m, "embedding_copied", False) and (m.pre_process or m.post_process)
    ]
    if not weights:
        return
    (weight,) = weights  # the first stage holds the table, the last its copy: never both on one rank
    grad = weight.main_grad if hasattr(weight, "main_grad") else weight.grad
    torch.distributed.all_reduce(grad, group=parallel_state.get_embedding_group())
