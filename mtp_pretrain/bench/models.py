"""What the benchmark tools share: the model-shape options and building a bench model + engine.

The tools are scripts (``python tools/<name>.py``), so this module is imported as a sibling.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch


def add_shape_args(
    p: argparse.ArgumentParser, *, hidden: int, heads: int, trunk_layers: int, seq: int, batch: int, vocab: int
) -> None:
    """--hidden --heads --trunk-layers --seq --batch --vocab with this tool's defaults."""
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--heads", type=int, default=heads, help="attention heads")
    p.add_argument("--trunk-layers", type=int, default=trunk_layers, help="trunk blocks; the n head blocks come on top")
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--vocab", type=int, default=vocab)


def bench_model(args: argparse.Namespace, n: int, bf16: bool = False, **mtp: Any) -> tuple[Any, Any, Any, Any]:
    """(ModelConfig, MTPConfig, TransformerConfig, this rank's MTPModel stage on the device): a trunk of
    ``args.trunk_layers`` blocks + n heads, parallel layout from ``args.tp``/``args.pp`` when present."""
    from megatron.core import parallel_state

    from mtp_pretrain.config import ModelConfig, MTPConfig
    from mtp_pretrain.model.mtp_model import build_model, transformer_config

    cfg = ModelConfig(preset="bench", num_layers=args.trunk_layers + n, hidden_size=args.hidden,
                      num_attention_heads=args.heads, seq_len=args.seq)  # fmt: skip
    mtp_cfg = MTPConfig(n=n, **mtp)
    tconf = transformer_config(cfg, mtp_cfg, tp=getattr(args, "tp", 1), pp=getattr(args, "pp", 1), bf16=bf16)
    model = build_model(
        cfg, mtp_cfg, args.vocab, tconf,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
    )  # fmt: skip
    if torch.cuda.is_available():
        model.cuda()
    return cfg, mtp_cfg, tconf, model


def random_step(engine: Any, args: argparse.Namespace, sample_len: int, generator: torch.Generator | None = None) -> None:
    """One training step of ``engine`` on a random [batch, sample_len] micro-batch (all targets valid)."""
    tokens = torch.randint(0, args.vocab, (args.batch, sample_len), generator=generator)  # the engine moves it
    engine.train_step(iter([(tokens, torch.ones_like(tokens, dtype=torch.bool))]), 1, args.seq, args.batch)
