"""What a benchmark reads and writes: its command line (the shared --json and model-shape options) and its
JSON result. (The benchmarks that measure the trainer's own set-up compose its config with
mtp_pretrain.config.compose_train_config.)"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mtp_pretrain.config import ATTENTION_BACKENDS

R = TypeVar("R")


def bench_parser(doc: str | None, results_json: bool = True) -> argparse.ArgumentParser:
    """The parser of a benchmark: its module docstring as the help text, and --json (unless not
    ``results_json``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if results_json:
        p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return p


def add_shape_args(
    p: argparse.ArgumentParser,
    *,
    hidden: int,
    heads: int,
    trunk_layers: int,
    seq: int,
    batch: int,
    vocab: int,
) -> None:
    """--hidden --heads --trunk-layers --seq --batch --vocab with this benchmark's defaults, and --attention
    (model.attention; the tables name the backend that ran, so rows compare like with like)."""
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--heads", type=int, default=heads, help="attention heads")
    p.add_argument(
        "--trunk-layers", type=int, default=trunk_layers, help="trunk blocks; the n head blocks come on top"
    )
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS, help="model.attention")


def write_json(path: str | Path, result: Any) -> None:
    """``result`` as indented JSON at ``path`` (its directory created; paths and the like as strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def report(result: R, print_table: Callable[[R], None], json_path: str | Path | None) -> R:
    """A benchmark's ending: its table printed, the result written as JSON when asked (--json), returned."""
    print_table(result)
    if json_path:
        write_json(json_path, result)
    return result
