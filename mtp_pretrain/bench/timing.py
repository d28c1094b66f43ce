"""Timed steps: one step's wall time (device work included), several setups' steps interleaved, and step
times against FLOPs (the FLOPs themselves come from mtp_pretrain.flops)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

K = TypeVar("K")
T = TypeVar("T")


def synchronize() -> None:
    """Wait for the GPU's queued work (a no-op on CPU): a timer read before it would miss that work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """(fn(), its wall-clock seconds), the device's work included."""
    synchronize()
    t0 = time.perf_counter()
    out = fn()
    synchronize()
    return out, time.perf_counter() - t0


def interleaved(
    steps: Mapping[K, Callable[[], T]], warmup: int, rounds: int, alternate: bool = False
) -> tuple[dict[K, list[float]], dict[K, list[T]]]:
    """``warmup + rounds`` rounds, each running every setup's step once, so machine noise hits all setups
    alike; ``alternate`` reverses the order every other round (no setup always runs first).

    Returns each setup's step times of the timed rounds (the warm-up rounds are not timed) and its step
    results of every round."""
    times: dict[K, list[float]] = {k: [] for k in steps}
    results: dict[K, list[T]] = {k: [] for k in steps}
    order = list(steps)
    for i in range(warmup + rounds):
        for k in order if not alternate or i % 2 == 0 else order[::-1]:
            out, seconds = timed(steps[k])
            results[k].append(out)
            if i >= warmup:
                times[k].append(seconds)
    return times, results


def time_over_flops(
    step_s: Mapping[int, float], flops_per_token: Mapping[int, float], n: int = 4, ref: int = 1
) -> dict[str, float]:
    """How n heads' step time grows over ``ref`` heads' compared with its FLOPs: time_ratio, flop_ratio and
    time_over_flops (1.0: the extra heads cost exactly their FLOPs; above: more)."""
    time_ratio = step_s[n] / step_s[ref]
    flop_ratio = flops_per_token[n] / flops_per_token[ref]
    return {"time_ratio": time_ratio, "flop_ratio": flop_ratio, "time_over_flops": time_ratio / flop_ratio}


def format_time_over_flops(r: Mapping[str, float], n: int = 4, ref: int = 1) -> str:
    return (
        f"time ratio n{n}/n{ref} {r['time_ratio']:.3f} | FLOP ratio {r['flop_ratio']:.3f} | "
        f"time/FLOP ratio {r['time_over_flops']:.3f}"
    )
