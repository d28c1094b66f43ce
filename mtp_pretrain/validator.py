"""Validation: per-head held-out loss and accuracy, the same documents at every validation, and the draft
acceptance of self-speculative decoding they imply (``accept_k``, ``tokens_per_forward``: teacher-forced, free
from the same forward; :meth:`~mtp_pretrain.targets.HeadStats.acceptance` states the estimator).

Bad validation data follows ``data.on_error`` like training data: ``skip`` skips, counts (:attr:`Validator.errors`)
and logs each bad shard or sample, ``raise`` raises a one-line :class:`~mtp_pretrain.errors.DataError` naming it.
Missing or unreadable validation shards are found before the first step
(:func:`~mtp_pretrain.data.sources.preflight`), not here.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from mtp_pretrain.config import Config
from mtp_pretrain.data.datasets import Dataset
from mtp_pretrain.data.sources import validation_batches
from mtp_pretrain.engine.base import Engine
from mtp_pretrain.targets import with_targets

log = logging.getLogger(__name__)


class Validator:
    """``trainer.val_batches`` micro-batches per DP rank of the validation shards, read from the start each
    time, without shuffling. A rank whose share of the shards ends early runs fully padded batches (they count
    nothing), so every rank runs the same collectives."""

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        val: Sequence[Dataset],
        tokenizer_path: Path,
        eos: int,
        pad: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        self.cfg, self.engine, self.val, self.tokenizer_path = cfg, engine, list(val), tokenizer_path
        self.eos, self.pad, self.dp_rank, self.dp_size = eos, pad, dp_rank, dp_size
        self.errors: dict[str, int] = {}  # shards/samples this rank skipped in its last validation

    def run(self, weights: Sequence[float] | None = None) -> dict[str, float]:
        """``loss`` (weighted like training), ``loss/head{k}`` and ``acc/head{k}`` (k = 1..n), ``accept_k``
        (k = 2..n) and ``tokens_per_forward`` (n > 1); {} off the last stage."""
        cfg, t = self.cfg, self.cfg.trainer
        sample_len = cfg.model.seq_len + cfg.mtp.n
        stream = validation_batches(
            self.val,
            self.tokenizer_path,
            t.micro_batch_size,
            sample_len,
            reader=self.dp_rank,
            num_readers=self.dp_size,
            on_error=cfg.data.on_error,
            text_field=cfg.data.text_field,
        )
        padding = itertools.repeat(torch.full((t.micro_batch_size, sample_len), self.pad, dtype=torch.long))
        batches = with_targets(
            itertools.islice(itertools.chain(stream, padding), t.val_batches),
            self.eos,
            self.pad,
            cfg.data.mask_doc_boundaries,
        )
        _, stats = self.engine.eval_step(batches, t.val_batches, cfg.model.seq_len, t.micro_batch_size)
        self.errors = dict(stream.errors)
        if any(self.errors.values()):
            log.warning(
                "validation (DP rank %d) skipped bad data: %s (data.on_error=skip; each is named above)",
                self.dp_rank,
                ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.errors.items()),
            )
        if stats is None:
            return {}
        m = stats.metrics()
        weights = cfg.mtp.weights() if weights is None else weights  # the step's (mtp.weight_schedule)
        loss = sum(w * m[f"loss/head{i}"] for i, w in enumerate(weights, start=1))
        return {"loss": loss, **m, **stats.acceptance()}
