"""Floating-point comparisons shared by the parity tests. A bound is a number of ulps (eps of the dtype) of
the compared tensor's largest entry: the size of a reordered sum's rounding error when its summands are at
most that large. Each call says why its count of ulps fits the computation it compares."""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 7.8e-3


def assert_within_ulps(
    got: torch.Tensor, want: torch.Tensor, ulps: float, eps: float = EPS32, name: str = ""
) -> None:
    """Every entry of ``got`` within ``ulps`` x ``eps`` x max|want| of ``want`` (absolute, for every entry alike:
    entries that cancel to ~0 carry the rounding error of their summands, not of their own size)."""
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=ulps * eps * scale, msg=lambda m: f"{name}: {m}")


def assert_same_gradient(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """The same per-position products summed in another order (per head and chunk, dW accumulated by hand):
    fp32 reordering noise of the summands' size, bounded by the tensor's largest entry (measured up to 12
    ulps of it on AVX-512, AVX2 and scalar kernels; 64 leaves room), also for entries that cancel to ~0."""
    assert_within_ulps(got, want, 64, name=name)


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same fp32 function computed in another order (another implementation of megatron's modules, or
    other query blocks): reordered sums of 64- to 256-long products through a few blocks, a few ulps of the
    logits' largest magnitude (measured up to 5.2 on AVX-512, AVX2 and scalar kernels); 64 leaves room, for
    every logit alike."""
    assert_within_ulps(got, want, 64, name="logits")
