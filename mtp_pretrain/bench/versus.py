"""Models trained side by side, each by the project's own MegatronEngine: the peak memory of one training
step in a fresh process per model, step times interleaved in one process, and every prediction's loss per
step (megatron_mtp.py and head_types.py compare their models this way).

 - peak memory: one fresh subprocess per model (``python -m <benchmark module> ... --memory-child NAME``),
   with the loss-memory benchmark's method (memory.PeakMemory): on CPU the resident-set high-water mark,
   reset right before a step, minus the resident set before it (glibc's mmap threshold pinned low from the
   child's start, so freed tensors leave the RSS); on a GPU, max_memory_allocated. The figure is the whole
   training step's peak (forward, backward, optimizer step) on top of what lives between steps
   (parameters, gradient buffers, optimizer state: allocated by a warm-up step first); the minimum over
   the measured steps is kept. The process's whole resident peak is reported too (CPU only). A fresh
   process per model: no model's leftovers (allocator caches, lazily built kernels, imports made by its
   first step) count in another's figure, whichever runs first.
 - step time: every model in this process, warm-up rounds first, then timed rounds, each running every
   model's step once (alternating the order) so machine noise hits all alike; the median is reported.
Each model trains on one fixed batch (the same tokens for all; a model reads the first ``sample length``
of each row); its loss must fall over the steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mtp_pretrain import compat
from mtp_pretrain.bench.memory import PeakMemory
from mtp_pretrain.bench.models import train_on
from mtp_pretrain.bench.process import MMAP_THRESHOLD, distributed_world
from mtp_pretrain.bench.timing import interleaved
from mtp_pretrain.processes import child_env

# a model's (engine, sample length): the engine trains on [batch, sample length] tokens
Builder = Callable[[argparse.Namespace], tuple[Any, int]]
MEMORY_MARK = "MEMORY_JSON "


def add_run_args(p: argparse.ArgumentParser, models: Sequence[str], steps: int = 3) -> None:
    """--steps --warmup --memory-steps --memory-jobs, and the internal --memory-child NAME."""
    p.add_argument("--steps", type=int, default=steps, help="timed steps per model (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    p.add_argument("--memory-steps", type=int, default=1, help="measured steps per memory subprocess")
    p.add_argument(
        "--memory-jobs", type=int, default=2, help="memory subprocesses alive at once (each holds a model)"
    )
    p.add_argument("--memory-child", choices=models, default=None, help=argparse.SUPPRESS)


def optim() -> Any:
    from mtp_pretrain.config import OptimConfig

    return OptimConfig(warmup_steps=0)  # the project's defaults, without the LR ramp from 0 (the loss moves)


def fixed_tokens(args: argparse.Namespace, length: int) -> torch.Tensor:
    """The one batch every model trains on: [batch, length] random tokens, the same in every process."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, args.vocab, (args.batch, length), generator=gen).to(compat.device())


def per_prediction_losses(result: Any) -> list[float]:
    """Mean CE of each prediction (t+1 .. t+n) of one step (a StepResult's HeadStats)."""
    stats = result.head_stats
    return (stats.loss_sum.detach().double() / stats.count.detach().double().clamp(min=1)).cpu().tolist()


def param_count(engine: Any) -> int:
    return sum(p.numel() for p in engine.module.parameters())


# -- peak memory: one fresh process per model --------------------------------------------------------------


def memory_child(build: Builder, args: argparse.Namespace, length: int) -> dict:
    """Build one model, warm it up, measure its training step's peak; run in a process of its own, whose
    result is printed after MEMORY_MARK."""
    with distributed_world():
        engine, sample_len = build(args)
        tokens = fixed_tokens(args, length)[:, :sample_len]
        train_on(engine, tokens, args.seq, args.batch)  # warm-up: gradient buffers, optimizer state
        measured = []
        for _ in range(max(args.memory_steps, 1)):
            with PeakMemory() as mem:
                train_on(engine, tokens, args.seq, args.batch)
            measured.append(mem)
        result = {"peak_bytes": min(m.added for m in measured), "params": param_count(engine)}
        if not torch.cuda.is_available():
            result["rss_peak_bytes"] = measured[-1].peak  # since the last measured step's reset
    print(MEMORY_MARK + json.dumps(result), flush=True)
    return result


class MemoryRuns:
    """The memory subprocesses of ``names`` (``python -m module argv --memory-child NAME``), at most ``jobs``
    alive at once: the first ``jobs`` start now, each later one when :meth:`results` has collected one."""

    def __init__(self, module: str, argv: Sequence[str], names: Sequence[str], jobs: int) -> None:
        self._cmd = [sys.executable, "-m", module, *argv]
        self._waiting = list(names)
        self._running: dict[str, subprocess.Popen] = {}
        for _ in range(max(jobs, 1)):
            self._start_next()

    def _start_next(self) -> None:
        if self._waiting:
            name = self._waiting.pop(0)
            self._running[name] = subprocess.Popen(
                [*self._cmd, "--memory-child", name],
                # each child a world of one, with the memory method's allocator setting from its start
                env=child_env(MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

    def results(self) -> dict[str, dict]:
        """Every model's measurement (waits for them, in order); raises if one failed."""
        out = {}
        while self._running:
            name, proc = next(iter(self._running.items()))
            stdout, stderr = proc.communicate()
            del self._running[name]
            self._start_next()
            lines = [ln for ln in stdout.splitlines() if ln.startswith(MEMORY_MARK)]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"memory run of {name} failed (rc {proc.returncode}):\n{stderr[-4000:]}")
            out[name] = json.loads(lines[-1][len(MEMORY_MARK) :])
        return out

    def close(self) -> None:
        """Kill what still runs (after a failure) and start nothing more."""
        self._waiting.clear()
        for proc in self._running.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


# -- the run -----------------------------------------------------------------------------------------------


def summary(memory: Mapping[str, Any], times: list[float], losses: list[list[float]]) -> dict[str, Any]:
    """One model's figures: params, peak_mib (rss_peak_mib on CPU), step_s (median), step_times_s, losses
    (per step: each prediction's mean CE), loss_first / loss_last (their means) and loss_decreased."""
    out: dict[str, Any] = {"params": memory["params"], "peak_mib": memory["peak_bytes"] / 2**20}
    if "rss_peak_bytes" in memory:
        out["rss_peak_mib"] = memory["rss_peak_bytes"] / 2**20
    out |= {"step_s": statistics.median(times), "step_times_s": times, "losses": losses}
    out["loss_first"] = statistics.fmean(losses[0])
    out["loss_last"] = statistics.fmean(losses[-1])
    out["loss_decreased"] = len(losses) > 1 and out["loss_last"] < out["loss_first"]
    return out


def run_models(
    module: str, argv: Sequence[str], builders: Mapping[str, Builder], args: argparse.Namespace, length: int
) -> dict[str, dict[str, Any]]:
    """Every model's :func:`summary`: memory in fresh subprocesses of ``module`` (their --memory-child runs
    :func:`memory_child`), step times and losses here, on the first ``length`` tokens of the fixed batch."""
    # The memory runs overlap with this process's imports and model builds (the memory figure does not
    # depend on CPU contention); all are collected before anything is timed.
    memory_runs = MemoryRuns(module, argv, list(builders), args.memory_jobs)
    try:
        with distributed_world():
            tokens = fixed_tokens(args, length)
            setups = {name: build(args) for name, build in builders.items()}
            memory = memory_runs.results()
            steps = {
                name: (lambda e=engine, n=sample_len: train_on(e, tokens[:, :n], args.seq, args.batch))
                for name, (engine, sample_len) in setups.items()
            }
            times, results = interleaved(steps, args.warmup, args.steps, alternate=True)
    finally:
        memory_runs.close()
    return {
        name: summary(memory[name], times[name], [per_prediction_losses(r) for r in results[name]])
        for name in builders
    }
