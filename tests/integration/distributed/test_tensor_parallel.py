"""Multi-rank checks, launched with torchrun on gloo (each launch costs ~20 s here: keep them few)."""

import json
from dataclasses import replace

import torch

from mtp_pretrain.build import build_model
from mtp_pretrain.config import MTPConfig
from mtp_pretrain.model.mtp_model import transformer_config
from tests.integration.distributed import loss_parity_tp as script
from tests.launch import INTEGRATION, torchrun
from tests.numerics import EPS32, assert_within_ulps


def test_memory_efficient_loss_with_tp2_equals_naive_and_tp1(dist_world, tmp_path):
    out, logits_file = tmp_path / "losses.json", tmp_path / "logits.pt"
    proc = torchrun(2, INTEGRATION / "distributed" / "loss_parity_tp.py", str(out), str(logits_file))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tp2 = json.loads(out.read_text())
    # the same models and batches in this (TP=1) process
    for key, loss_tp2 in tp2.items():
        n, chunk, tie = key.split("-")
        cfg = replace(script.CFG, tie_embeddings=tie == "True")
        torch.manual_seed(0)
        mtp = MTPConfig(n=int(n), chunk_size=int(chunk), loss_weights=[1.0 + 0.5 * i for i in range(int(n))])
        model = build_model(cfg, mtp, script.VOCAB, transformer_config(cfg, mtp))
        tokens, valid = script.batch(int(n))
        loss_tp1, _ = model(tokens, valid)
        # the same function split over 2 ranks (row-parallel partial sums, vocab-parallel CE): fp32
        # reduction order, a few ulps of the loss; 16 as in tests/unit/test_loss.py
        assert abs(loss_tp1.item() - loss_tp2) <= 16 * EPS32 * abs(loss_tp2), (key, loss_tp1.item(), loss_tp2)
        if int(n) == 4:  # the layout-independent init makes TP=2 the same function as TP=1
            tp2_logits = torch.load(logits_file, weights_only=True)
            for a, b in zip(model.head_logits(tokens[:, : script.CFG.seq_len]), tp2_logits, strict=True):
                # reordered fp32 sums through 5 blocks: a few ulps of the logits' largest magnitude; 64
                assert_within_ulps(a, b, 64, name="TP1 vs TP2 logits")
