"""Run under torchrun (2 ranks, gloo): the memory-efficient loss equals the naive one with TP=2.

Each rank builds the naive and the memory-efficient model from the same seed (megatron's CPU
initialisation creates the full weight on every rank, then keeps this rank's shard), runs one
forward/backward for n in {1, 2, 4} with chunking and padding, and compares every local gradient shard.
Writes the losses to argv[1] and the n=4 heads' gathered logits to argv[2] so the pytest side can compare them with a TP=1 run.
"""

import json
import sys
from dataclasses import replace

import torch

from mtp_pretrain import parallel
from mtp_pretrain.build import build_model
from mtp_pretrain.config import ModelConfig, MTPConfig
from mtp_pretrain.model.mtp_model import transformer_config
from tests.numerics import EPS32, assert_same_gradient

VOCAB = 256
CFG = ModelConfig(preset="test", num_layers=5, hidden_size=64, num_attention_heads=4, seq_len=24)


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, CFG.seq_len + n), generator=g)
    valid = torch.rand(tokens.shape, generator=g) > 0.1
    return tokens, valid


def models(n: int, chunk: int, tie: bool = False):
    cfg = replace(CFG, tie_embeddings=tie)
    out = []
    for efficient in (False, True):
        torch.manual_seed(0)
        mtp = MTPConfig(
            n=n, memory_efficient=efficient, chunk_size=chunk, loss_weights=[1.0 + 0.5 * i for i in range(n)]
        )
        out.append(build_model(cfg, mtp, VOCAB, transformer_config(cfg, mtp, tp=2)))
    return out


def main() -> None:
    parallel.init_distributed(tp=2)
    losses = {}
    for n, chunk, tie in [(1, 0, False), (2, 7, False), (4, 5, False), (3, 0, True)]:
        naive, eff = models(n, chunk, tie)
        tokens, valid = batch(n)
        loss_n, stats_n = naive(tokens, valid)
        loss_e, stats_e = eff(tokens, valid)
        loss_n.backward()
        loss_e.backward()
        # the bounds and their reasons are those of tests/unit/test_loss.py (the same sums, now per TP rank)
        torch.testing.assert_close(loss_e, loss_n, rtol=16 * EPS32, atol=0)
        torch.testing.assert_close(stats_e.packed(), stats_n.packed(), rtol=16 * EPS32, atol=0)
        ref = dict(naive.named_parameters())
        for name, p in eff.named_parameters():
            assert_same_gradient(p.grad, ref[name].grad, f"n={n} {name}")
        losses[f"{n}-{chunk}-{tie}"] = loss_e.item()
        if n == 4:  # whole-vocabulary logits of every head, gathered over TP, for the TP=1 comparison
            logits = []
            for local in eff.head_logits(tokens[:, : CFG.seq_len]):
                parts = [torch.empty_like(local) for _ in range(2)]
                torch.distributed.all_gather(parts, local.contiguous())
                logits.append(torch.cat(parts, dim=-1))
    if torch.distributed.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(losses, f)
        torch.save(logits, sys.argv[2])
    parallel.destroy_distributed()


if __name__ == "__main__":
    main()
