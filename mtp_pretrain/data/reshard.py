"""Re-dealing reader positions when the number of readers changes (data-parallel size or worker count).

A checkpoint holds every reader's :class:`~mtp_pretrain.data.stream.PackedBatchStream` state; a run with
another reader count cannot load them one to one, so :func:`reshard_states` turns them into states for the
new readers that read exactly the unread rest of the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtp_pretrain.data.datasets import Dataset, epoch_order
from mtp_pretrain.data.shard_reader import ERROR_KINDS
from mtp_pretrain.data.stream import new_cursor


def reshard_states(
    old: Sequence[dict[str, Any] | None],
    new_readers: int,
    datasets: Sequence[Dataset],
    seed: int,
    shuffle_shards: bool = True,
) -> list[dict[str, Any]]:
    """Reader states for ``new_readers`` readers that continue where ``old`` readers (indexed by reader
    number; None = never handed out a batch) stopped, when data-parallel size or worker count changed.

    The rule, per dataset: let ``e0``/``e1`` be the lowest/highest epoch any old reader is in. For every
    epoch ``e0 <= e <= e1`` the work nobody has read yet (the rest of each old reader's current shard from its
    sample offset, its unread shards, and the whole share of readers that had not reached ``e``) is listed
    in old-reader order and dealt ``items[r::new_readers]``; later epochs are dealt as usual. The old packing
    buffers (tokens read but not yet trained on) go to new reader ``r % new_readers``, in front. So no
    document is repeated or skipped; only the position in the document order changes. Mixing counts restart.
    """
    num_old = len(old)
    states: list[dict[str, Any]] = [
        {
            "cursors": [new_cursor() for _ in datasets],
            "samples_per_dataset": [0] * len(datasets),
            "batches_yielded": 0,
            "errors": dict.fromkeys(ERROR_KINDS, 0),
            "seed": seed,
            "reader": r,
            "num_readers": new_readers,
            "num_shards": [len(d.urls) for d in datasets],
        }
        for r in range(new_readers)
    ]
    for k in ERROR_KINDS:
        states[0]["errors"][k] = sum(int(st["errors"].get(k, 0)) for st in old if st)
    for j, ds in enumerate(datasets):
        cursors = [st["cursors"][j] if st else new_cursor() for st in old]

        def items_of(r: int, epoch: int) -> list[list]:
            plan = cursors[r].get("plan", {}).get(str(epoch))  # noqa: B023 (used within this iteration)
            if plan is not None:
                return [[u, int(k)] for u, k in plan]
            order = epoch_order(ds.urls, seed, j, epoch, shuffle_shards)  # noqa: B023
            return [[u, 0] for u in order[r::num_old]]

        first, last = min(c["epoch"] for c in cursors), max(c["epoch"] for c in cursors)
        for epoch in range(first, last + 1):
            todo: list[list] = []
            for r, c in enumerate(cursors):
                if c["epoch"] > epoch:
                    continue
                mine = items_of(r, epoch)
                if c["epoch"] == epoch:
                    mine = mine[c["shard_pos"] :]
                    if mine:
                        mine[0] = [mine[0][0], max(mine[0][1], int(c["sample_offset"]))]
                todo += mine
            for r in range(new_readers):
                states[r]["cursors"][j]["plan"][str(epoch)] = todo[r::new_readers]
        for r in range(new_readers):
            states[r]["cursors"][j]["epoch"] = first
        for r, c in enumerate(cursors):
            states[r % new_readers]["cursors"][j]["buffer"] += [int(t) for t in c["buffer"]]
    return states
