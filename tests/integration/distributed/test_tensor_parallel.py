"""Multi-rank checks, launched with torchrun on gloo (each launch costs ~20 s here: keep them few)."""

import json
from dataclasses import replace
from pathlib import Path

import torch

from mtp_pretrain.build import build_model
from mtp_pretrain.config import MTPConfig
from mtp_pretrain.model.mtp_model import transformer_config
from tests.integration.distributed import loss_parity_tp as script
from tests.launch import INTEGRATION, torchrun

EPS32 = torch.finfo(torch.float32).eps


def launch_all(out: Path, script: str, launches: dict[int, list[str]]) -> Path:
    """One torchrun launch per world size of tests/distributed/<script> OUT SPEC...; fails with its output."""
    for world, specs in launches.items():
        proc = torchrun(world, INTEGRATION / "distributed" / script, str(out), *specs, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def compare_to_reference(
    name: str, history: list[dict], ref_history: list[dict], loaded: dict, ref_params: dict, lr: float
) -> tuple[float, float]:
    """Run ``name`` against the single-process reference (fp32, Adam at peak ``lr``): every step's losses,
    accuracies and gradient norm, then every final parameter; returns (worst relative loss or gradient-norm
    difference in fp32 eps, worst parameter difference)."""
    assert len(history) == len(ref_history) > 0
    worst_rel = worst_param = 0.0
    for step, (got, want) in enumerate(zip(history, ref_history, strict=True)):
        for key in [k for k in want if k.startswith(("loss", "grad_norm"))]:
            # losses, and the pre-clipping norm of the reduced gradients (what Adam's scale invariance would
            # hide: a gradient summed twice or averaged over the wrong count): fp32 sums split over other
            # ranks and micro-batches, and parameters apart by the Adam noise below, which moves a loss or a
            # norm only at second order; measured <= 1.8 eps relative, bound 16
            rel = abs(got[key] - want[key]) / abs(want[key])
            worst_rel = max(worst_rel, rel / EPS32)
            assert rel <= 16 * EPS32, (name, step, key, got[key], want[key])
        for key in [k for k in want if k.startswith("acc")]:
            # hits / positions, both exact: equal unless an argmax's top two logits tie within fp32 noise
            assert got[key] == want[key], (name, step, key, got[key], want[key])
    # Adam normalises each entry's step to ~lr. Reduction-order noise in a near-zero gradient entry changes
    # that entry's step by a fraction of it (measured up to 4e-6 = lr/750 over the layouts and ZeRO stages,
    # AVX-512 and AVX2 kernels); a layout bug (an update missing, doubled or on the wrong shard, a gradient
    # without one rank's part) moves entries by whole steps. lr/30 separates the two.
    for key, want in ref_params.items():
        worst_param = max(worst_param, (loaded[key] - want).abs().max().item())
        torch.testing.assert_close(
            loaded[key], want, rtol=0, atol=lr / 30, msg=lambda m, key=key: f"{name} {key}: {m}"
        )
    return worst_rel, worst_param


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
                torch.testing.assert_close(a, b, rtol=0, atol=64 * EPS32 * float(b.abs().max()))
