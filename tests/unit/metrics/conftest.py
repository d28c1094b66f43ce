"""Helpers shared by the metrics tests: synthetic trainer metric dicts, a logging config, jsonl reading."""

from __future__ import annotations

import json
from pathlib import Path

from mtp_pretrain.config import LoggingConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_metrics(step: int, n_heads: int = 4) -> dict[str, float]:
    m: dict[str, float] = {
        "lr": 3e-4,
        "grad_norm": 0.81,
        "tokens_per_s": 12345.0,
        "mfu": 0.012,
        "mem_gb": 1.5,
    }
    total = 0.0
    for k in range(1, n_heads + 1):
        loss = 2.0 + 0.1 * k + 1.0 / (step + 1)
        m[f"loss/head{k}"] = loss
        m[f"acc/head{k}"] = 0.5 / k
        total += loss
    m["loss"] = total / n_heads
    return m


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logging_cfg(**kw) -> LoggingConfig:
    base = {"wandb_mode": "disabled", "run_name": "t", "log_every": 2, "plot": True}
    base.update(kw)
    return LoggingConfig(**base)
