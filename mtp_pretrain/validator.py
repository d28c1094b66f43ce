"""Validation: per-head held-out loss and accuracy, the same documents at every validation."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch

from mtp_pretrain.config import Config
from mtp_pretrain.data.datasets import Dataset
from mtp_pretrain.data.sources import validation_batches
from mtp_pretrain.engine.base import Engine
from mtp_pretrain.targets import with_targets


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

    def run(self) -> dict[str, float]:
        """``loss`` (weighted like training), ``loss/head{k}`` and ``acc/head{k}``; {} off the last stage."""
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
        if stats is None:
            return {}
        m = stats.metrics()
        weights = cfg.mtp.weights()
        return {"loss": sum(w * m[f"loss/head{i}"] for i, w in enumerate(weights, start=1)), **m}
