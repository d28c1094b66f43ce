"""The datasets of a mix and the shard order of each of their epochs, the same on every reader.

Per dataset and epoch the shard list is shuffled with one seeded RNG; every reader computes the same
order and takes its own deal of it (:class:`~mtp_pretrain.data.stream.PackedBatchStream`), so no reader
needs to talk to another to agree on who reads what.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from mtp_pretrain.data.shard_reader import expand_urls


@dataclass(frozen=True)
class Dataset:
    """One dataset of a mix: its shard URLs and its share of the training samples."""

    urls: tuple[str, ...]
    weight: float = 1.0
    name: str = "data"

    @classmethod
    def of(cls, urls: str | Sequence[str], weight: float = 1.0, name: str = "data") -> Dataset:
        expanded = expand_urls(urls)
        if not expanded:
            raise ValueError(f"dataset {name!r} has no shard URLs")
        if not weight > 0:
            raise ValueError(f"dataset {name!r}: weight must be > 0, got {weight}")
        return cls(tuple(expanded), float(weight), name)


def epoch_order(urls: Sequence[str], seed: int, dataset: int, epoch: int, shuffle: bool = True) -> list[str]:
    """The shard order of ``epoch`` of dataset number ``dataset``: the same on every reader."""
    order = list(urls)
    if shuffle:
        random.Random(f"{seed}/{dataset}/{epoch}").shuffle(order)
    return order
