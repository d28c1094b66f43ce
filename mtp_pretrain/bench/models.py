"""The models the benchmarks train and how they take a step: a trunk + n heads built by the project's own
builders (the path `mtp-train` takes), on this process's device, and one engine step on given tokens."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from mtp_pretrain.config import ModelConfig, MTPConfig


def shape_config(args: argparse.Namespace, num_layers: int) -> ModelConfig:
    """The model of the shape options (options.add_shape_args) with ``num_layers`` blocks in all."""
    return ModelConfig(
        preset="bench",
        num_layers=num_layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        seq_len=args.seq,
        attention=args.attention,  # model.attention: the core attention backend (--attention)
    )


def on_device(model: torch.nn.Module) -> torch.nn.Module:
    """The model on this process's GPU, or left on the CPU."""
    return model.cuda() if torch.cuda.is_available() else model


def build_on_device(cfg: ModelConfig, mtp: MTPConfig, vocab: int, tconf: Any) -> torch.nn.Module:
    """This rank's stage of the MTP model (no virtual pipeline), built as `mtp-train` builds it, on the
    device."""
    from mtp_pretrain.build import build_pipeline_chunks

    (model,) = build_pipeline_chunks(cfg, mtp, vocab, tconf)
    return on_device(model)


def bench_model(
    args: argparse.Namespace, n: int, bf16: bool = False, **mtp: Any
) -> tuple[ModelConfig, MTPConfig, Any, Any]:
    """(ModelConfig, MTPConfig, TransformerConfig, this rank's MTPModel stage on the device): a trunk of
    ``args.trunk_layers`` blocks + n heads (``mtp``: further MTPConfig fields), parallel layout from
    ``args.tp``/``args.pp`` when present."""
    from mtp_pretrain.model.mtp_model import transformer_config

    cfg = shape_config(args, args.trunk_layers + n)
    mtp_cfg = MTPConfig(n=n, **mtp)
    tconf = transformer_config(cfg, mtp_cfg, tp=getattr(args, "tp", 1), pp=getattr(args, "pp", 1), bf16=bf16)
    return cfg, mtp_cfg, tconf, build_on_device(cfg, mtp_cfg, args.vocab, tconf)


def train_on(engine: Any, tokens: torch.Tensor, seq: int, batch: int) -> Any:
    """One optimizer step of ``engine`` on ``tokens`` [batch, seq + n] (one micro-batch, every target valid);
    its StepResult."""
    return engine.train_step(iter([(tokens, torch.ones_like(tokens, dtype=torch.bool))]), 1, seq, batch)


def random_step(
    engine: Any, args: argparse.Namespace, sample_len: int, generator: torch.Generator | None = None
) -> Any:
    """One training step of ``engine`` on a random [batch, sample_len] micro-batch (the engine moves it)."""
    tokens = torch.randint(0, args.vocab, (args.batch, sample_len), generator=generator)
    return train_on(engine, tokens, args.seq, args.batch)
