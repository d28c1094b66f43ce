"""What the multi-rank parity tests share: launching a parity script per world size, and comparing a run
against the single-process reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from tests.launch import INTEGRATION, torchrun
from tests.numerics import EPS32, assert_within_ulps


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


def load_run(runs: Path, name: str, module: torch.nn.Module) -> tuple[list[dict], dict]:
    """Run ``name``'s per-step history and its final parameters, loaded resharded into ``module``'s layout."""
    history = json.loads((runs / f"{name}.json").read_text())
    loaded = dist_checkpointing.load({"model": module.sharded_state_dict()}, str(runs / name))["model"]
    return history, loaded


def relative_differences(got: dict, want: dict) -> dict[str, float]:
    """|got - want| / |want| (Frobenius norms) of every tensor."""
    return {k: float((got[k] - w).norm() / w.norm()) for k, w in want.items()}


def assert_step_gradients_equal(got: dict, want: dict, name: str) -> float:
    """The gradients of one optimizer step, reduced over ranks and micro-batches, against one process's: each
    entry an fp32 sum of the same per-position contributions in another order, a few ulps of the tensor's
    largest entry (64, as tests/unit/engine/test_megatron.py), and the issue's 1e-6 relative to each tensor's
    norm (measured: megatron DP2 x GA2 3.8 ulps / 2.4e-7, DeepSpeed ZeRO-3 4.2 ulps / 3.5e-7). Returns the
    worst relative difference."""
    for k, w in want.items():
        assert_within_ulps(got[k], w, 64, name=f"{name} {k}")
    worst = max(relative_differences(got, want).values())
    assert worst <= 1e-6, (name, worst)
    return worst
