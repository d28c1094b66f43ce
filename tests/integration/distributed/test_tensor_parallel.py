"""Multi-rank checks, launched with torchrun on gloo (each launch costs ~20 s here: keep them few)."""

import json
from dataclasses import replace
from pathlib import Path

import torch

from mtp_pretrain.config import MTPConfig
from mtp_pretrain.model.mtp_model import build_model, transformer_config
from tests.integration.distributed import loss_parity_tp as script
from tests.launch import INTEGRATION, torchrun


def launch_all(out: Path, script: str, launches: dict[int, list[str]]) -> Path:
    """One torchrun launch per world size of tests/distributed/<script> OUT SPEC...; fails with its output."""
    for world, specs in launches.items():
        proc = torchrun(world, INTEGRATION / "distributed" / script, str(out), *specs, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def compare_to_reference(name: str, history: list[dict], ref_history: list[dict], loaded: dict, ref_params: dict,
                         loss_tol: float, param_tol: float) -> tuple[float, float]:  # fmt: skip
    """Per-step per-head losses/accuracies and every parameter of run ``name`` against the reference;
    returns (worst loss difference, worst parameter difference)."""
    assert len(history) == len(ref_history) > 0
    worst_loss = worst_param = 0.0
    for step, (got, want) in enumerate(zip(history, ref_history, strict=True)):
        for key in [k for k in want if k.startswith(("loss", "acc"))]:
            worst_loss = max(worst_loss, abs(got[key] - want[key]))
            assert abs(got[key] - want[key]) < loss_tol, (name, step, key, got[key], want[key])
    for key, want in ref_params.items():
        worst_param = max(worst_param, (loaded[key] - want).abs().max().item())
        torch.testing.assert_close(loaded[key], want, rtol=0, atol=param_tol, msg=lambda m, key=key: f"{name} {key}: {m}")
    return worst_loss, worst_param


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
        assert abs(loss_tp1.item() - loss_tp2) < 1e-5, (key, loss_tp1.item(), loss_tp2)
        if int(n) == 4:  # the layout-independent init makes TP=2 the same function as TP=1
            tp2_logits = torch.load(logits_file, weights_only=True)
            for a, b in zip(model.head_logits(tokens[:, : script.CFG.seq_len]), tp2_logits, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
