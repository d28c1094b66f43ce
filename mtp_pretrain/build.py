"""Factories from the config: this rank's model chunks — the megatron-core model (model/) with the MTP loss
(loss.py) attached to its last stage, the one place that knows both — and the engine that trains them."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from mtp_pretrain.config import Config, ModelConfig, MTPConfig
from mtp_pretrain.engine.base import Engine
from mtp_pretrain.engine.megatron import MegatronEngine
from mtp_pretrain.loss import MTPLoss
from mtp_pretrain.model.attention import layer_spec
from mtp_pretrain.model.init import init_parameters
from mtp_pretrain.model.mtp_model import MTPModel, transformer_config
from mtp_pretrain.model.vocab import padded_vocab_size


def build_model(
    model: ModelConfig,
    mtp: MTPConfig,
    vocab_size: int,
    config: TransformerConfig,
    pre_process: bool = True,
    post_process: bool = True,
    seed: int = 0,
    vp_stage: int | None = None,
) -> MTPModel:
    """The model (or this rank's pipeline stage of it) from the structured config, initialised from `seed`
    identically under every parallel layout, its blocks with the core attention ``model.attention`` names.
    ``vocab_size`` is the tokenizer's; the embedding and unembedding are padded to a multiple of 128 x TP
    (megatron's rule), and the padding ids never get probability."""
    mtp_model = MTPModel(
        config,
        vocab_size=padded_vocab_size(vocab_size, config.tensor_model_parallel_size),
        real_vocab_size=vocab_size,
        n_heads=mtp.n,
        seq_len=model.seq_len,
        pre_process=pre_process,
        post_process=post_process,
        tie_embeddings=model.tie_embeddings,
        rotary_base=model.rotary_base,
        loss_fn=MTPLoss.from_config(mtp, vocab_limit=vocab_size) if post_process else None,
        layer_spec=layer_spec(model.attention),
        vp_stage=vp_stage,
        head_type=mtp.head_type,
    )
    init_parameters(mtp_model, config, total_layers=model.num_layers, seed=seed)
    return mtp_model


def build_pipeline_chunks(
    model: ModelConfig, mtp: MTPConfig, vocab_size: int, config: TransformerConfig, seed: int = 0
) -> list[MTPModel]:
    """This rank's model chunks: one, or `vpp` of them under the interleaved schedule. The embedding goes
    to the first chunk of pipeline rank 0, the heads and unembedding to the last chunk of the last rank."""
    vpp = config.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp and vpp > 1 else [None]
    return [
        build_model(
            model,
            mtp,
            vocab_size,
            config,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            seed=seed,
            vp_stage=vp,
        )
        for vp in stages
    ]


def build_engine(cfg: Config, vocab_size: int) -> Engine:
    """This rank's model chunks (seeded by ``trainer.seed``) in the engine ``parallel.engine`` names
    (DeepSpeed is imported only when asked for)."""
    t, p = cfg.trainer, cfg.parallel
    tconfig = transformer_config(
        cfg.model,
        cfg.mtp,
        p.tp,
        p.pp,
        bf16=t.bf16,
        recompute=t.recompute,
        stage_layers=(p.first_stage_layers, p.last_stage_layers),
        vpp=p.vpp,
    )
    chunks = build_pipeline_chunks(cfg.model, cfg.mtp, vocab_size, tconfig, seed=t.seed)
    if p.engine == "deepspeed":
        from mtp_pretrain.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(chunks[0], cfg.optim, t.steps, p, t.micro_batch_size, t.grad_accum, t.bf16)
    return MegatronEngine(
        chunks, tconfig, cfg.optim, t.steps, bf16=t.bf16, overlap_grad_reduce=p.overlap_grad_reduce
    )
