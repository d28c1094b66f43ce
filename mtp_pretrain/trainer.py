"""The training loop: builds the parts from the config, then steps, reports, validates and saves.

Every part has one job and its own module: data sources and loader (data/), the model chunks with their loss
and the engine (factories in build.py), the engine that reduces gradients and steps (engine/), the checkpoint manager over the stateful
parts (checkpoint_manager.py), the validator, the step metrics and the metric sinks (metrics/).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from mtp_pretrain import determinism, parallel, weight_schedule
from mtp_pretrain.build import build_engine
from mtp_pretrain.checkpoint_manager import CheckpointManager, DataPosition, TrainState
from mtp_pretrain.config import Config
from mtp_pretrain.data.loader import BatchLoader
from mtp_pretrain.data.sources import build_data_sources
from mtp_pretrain.data.tokenizer import eos_id, load_tokenizer, pad_id
from mtp_pretrain.engine.base import Batch, NonFiniteLossError, StepResult
from mtp_pretrain.loss import mtp_losses
from mtp_pretrain.metrics import MetricsLogger
from mtp_pretrain.preemption import StopRequest
from mtp_pretrain.rng import RNGState
from mtp_pretrain.run_lock import RunLock
from mtp_pretrain.step_metrics import StepMetrics
from mtp_pretrain.targets import with_targets
from mtp_pretrain.validator import Validator

MAX_NONFINITE_IN_A_ROW = 20  # under trainer.nonfinite=skip: more means the run diverged, not a bad batch


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # total training loss of every step run in this call
    head_losses: list[list[float]]  # per-head mean loss of every step run in this call
    val: dict[str, float]  # the last validation metrics
    run_dir: Path
    checkpoint: Path | None
    paths: dict[str, str]
    stopped: str | None = None  # why the run stopped early (signal / stop file), after saving; None = done
    nonfinite_steps: int = 0  # steps whose update was dropped because some loss was NaN/inf


class Trainer:
    """Builds every part from the config (fails early on bad input), then `fit()` trains."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, t, p = cfg, cfg.trainer, cfg.parallel
        determinism.configure(t.deterministic)  # before any kernel runs
        self.layout = parallel.init_distributed(p.tp, p.pp, seed=t.seed, vpp=p.vpp)
        self.run_dir = Path(t.run_dir)
        # one writer per run dir: before anything writes there; a second job fails naming the holder
        self.run_lock = RunLock(self.run_dir).acquire()
        sources = build_data_sources(cfg.data)
        self.tokenizer_path = sources.tokenizer_path
        tok = load_tokenizer(self.tokenizer_path)
        self.vocab_size, self.eos, self.pad = tok.get_vocab_size(), eos_id(tok), pad_id(tok)
        torch.manual_seed(t.seed)  # torch's own streams (dropout); weights come from init_parameters(seed)
        self.engine = build_engine(cfg, self.vocab_size)
        self.mtp_losses = mtp_losses(
            self.engine.models
        )  # this rank's (last stage): the weight schedule sets them
        dp_rank, dp = parallel_state.get_data_parallel_rank(), self.layout.dp
        self.train_data = BatchLoader(
            sources.train,
            self.tokenizer_path,
            t.micro_batch_size,
            cfg.model.seq_len + cfg.mtp.n,
            seed=t.seed,
            dp_rank=dp_rank,
            dp_size=dp,
            num_workers=cfg.data.num_workers,
            on_error=cfg.data.on_error,
            text_field=cfg.data.text_field,
        )
        self.validator = Validator(
            cfg, self.engine, sources.val, self.tokenizer_path, self.eos, self.pad, dp_rank, dp
        )
        self.state = TrainState()
        self.checkpoints = CheckpointManager(
            cfg,
            self.engine,
            {"trainer": self.state, "data": DataPosition(self.train_data, dp_rank, dp, cfg.data.num_workers)},
            {"rng": RNGState()},
            self.tokenizer_path,
        )
        self.checkpoints.restore()
        self._schedule_weights()  # those of the next step, for a validate() before fit() too
        self.step_metrics = StepMetrics(cfg, self.layout, self.vocab_size, self.train_data)
        self.metrics = MetricsLogger(
            cfg.logging,
            self.run_dir,
            total_steps=t.steps,
            start_step=self.step,
            enabled=parallel.is_logging_rank(),
            config_dict=dataclasses.asdict(cfg),
            n_heads=cfg.mtp.n,
        )

    @property
    def step(self) -> int:
        return self.state.step

    def validate(self) -> dict[str, float]:
        return self.validator.run(self.loss_weights)

    def save(self) -> Path:
        return self.checkpoints.save(self.step)

    def _micro_batches(self, stream: Iterator[torch.Tensor], count: int) -> Iterator[Batch]:
        return with_targets(
            itertools.islice(stream, count), self.eos, self.pad, self.cfg.data.mask_doc_boundaries
        )

    def fit(self) -> TrainResult:
        """Train to trainer.steps (or until asked to stop), validating and saving on the way."""
        self.run_lock.acquire()  # held since __init__; again for a later fit()
        stop_file = self.run_dir / self.cfg.trainer.stop_file if self.cfg.trainer.stop_file else None
        stop = StopRequest(stop_file, clear_stale=parallel.rank() == 0)  # another job's stale STOP: removed
        try:
            return self._loop(stop)
        finally:
            stop.close()
            self.train_data.close()  # stop the reader workers; a later fit() restarts them where they were
            self.run_lock.release()

    def _loop(self, stop: StopRequest) -> TrainResult:
        cfg, t = self.cfg, self.cfg.trainer
        losses, head_losses, val, ckpt = [], [], {}, None
        nonfinite, in_a_row = 0, 0
        while self.step < t.steps:
            start = time.perf_counter()
            weights = self._schedule_weights()
            batches = self._micro_batches(self.train_data, t.grad_accum)
            result = self.engine.train_step(
                batches, t.grad_accum, cfg.model.seq_len, t.micro_batch_size, stop.requested
            )
            self.state.step += 1
            self.state.consumed_tokens += self.step_metrics.tokens_per_step
            in_a_row = in_a_row + 1 if result.nonfinite else 0
            nonfinite += result.nonfinite
            if result.nonfinite:
                self._on_nonfinite(result, in_a_row)
            m = self.step_metrics.of_step(result, time.perf_counter() - start, nonfinite, weights)
            if self.metrics.emits(self.step):  # on all ranks: the data error counts are all-reduced
                m.update(self.step_metrics.data_errors())
            if result.head_stats is not None:
                losses.append(result.loss)
                head_losses.append([m[f"loss/head{i}"] for i in range(1, cfg.mtp.n + 1)])
                self.metrics.log_train(self.step, m)
            if t.val_every and (self.step % t.val_every == 0 or self.step == t.steps):
                val = self.validate()
                self.metrics.log_val(self.step, val)
            if stop.agreed(result.stop):
                ckpt = self.save()
                stop.acknowledge()
                if parallel.rank() == 0:
                    print(
                        f"stopping at step {self.step} ({stop.reason}): saved {ckpt}; resume continues from it"
                    )
                break
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps:
                ckpt = self.save()
        paths = self.metrics.finish()
        return TrainResult(
            self.step, losses, head_losses, val, self.run_dir, ckpt, paths, stop.reason, nonfinite
        )

    def _schedule_weights(self) -> list[float]:
        """Set this step's loss weights (mtp.weight_schedule at the progress before it) on this rank's losses.
        A function of the restored TrainState.step alone: a resumed run sets the uninterrupted run's weights."""
        weights = weight_schedule.head_weights(
            self.cfg.mtp, weight_schedule.progress(self.step, self.cfg.trainer.steps)
        )
        weight_schedule.set_weights(self.mtp_losses, weights)
        self.loss_weights = weights  # also on ranks without a loss (not the last stage)
        return weights

    def _on_nonfinite(self, result: StepResult, in_a_row: int) -> None:
        """The engine dropped this step's update; abort (nothing saved) if the policy or a streak says so."""
        policy = self.cfg.trainer.nonfinite
        if policy == "abort" or in_a_row >= MAX_NONFINITE_IN_A_ROW:
            why = "trainer.nonfinite=abort" if policy == "abort" else f"{in_a_row} steps in a row"
            raise NonFiniteLossError(
                f"non-finite loss ({result.loss}) at step {self.step} ({why}); nothing was saved after it. Resume "
                f"from the last checkpoint with a lower optim.lr or more optim.warmup_steps"
            )
        if parallel.is_logging_rank():
            print(
                f"step {self.step}: non-finite loss ({result.loss}): update dropped (trainer.nonfinite=skip)"
            )
