"""What several tests build: random token batches, attention-backend models and their gradients, and
held-out-like prompts for decoding."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mtp_pretrain.build import build_model
from mtp_pretrain.config import ModelConfig, MTPConfig
from mtp_pretrain.model.mtp_model import transformer_config

VOCAB = 256
MTP = MTPConfig(n=2)  # the attention-backend tests' heads


def random_batch(cfg: ModelConfig, n: int, padded: bool, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (batch, cfg.seq_len + n), generator=g)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    if padded:  # a ragged tail per sample plus scattered masked targets
        for b in range(batch):
            valid[b, cfg.seq_len + n - 3 * b - 1 :] = False
        valid &= torch.rand(tokens.shape, generator=g) > 0.1
    return tokens, valid


def attention_model(cfg: ModelConfig, backend: str, bf16: bool = False):
    cfg = dataclasses.replace(cfg, attention=backend)
    return build_model(cfg, MTP, VOCAB, transformer_config(cfg, MTP, bf16=bf16), seed=3)


def loss_and_grads(model, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss, _ = model(tokens)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.detach(), {n: g for n, g in zip(params, grads, strict=True) if g is not None}


def held_out_prompts(run, count: int) -> list[list[int]]:
    """Held-out-like prompts: windows of the corpus text of different lengths, and random token strings."""
    loaded, source = run.loaded, sorted(run.trainer.cfg.data.source)[0]
    texts = [p.read_text() for p in sorted(Path(source).glob("*.py"))]
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        if i % 4 == 3:
            out.append(torch.randint(2, loaded.decoder.cfg.vocab_size, (3 + i % 11,), generator=gen).tolist())
        else:
            ids = loaded.tokenizer.encode(texts[i % len(texts)]).ids
            start = (7 * i) % 40
            out.append(ids[start : start + 2 + i % 17])
    return out
