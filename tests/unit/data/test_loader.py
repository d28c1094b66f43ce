"""BatchLoader: DataLoader workers as readers, round-robin order, exact resume, every document once per epoch."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import torch

from mtp_pretrain.data.datasets import Dataset
from mtp_pretrain.data.loader import BatchLoader
from mtp_pretrain.data.stream import PackedBatchStream
from tests.unit.data.conftest import DOCS_PER_SHARD, N_DOCS, doc_ids, take

BATCH, SAMPLE = 2, 20


def loader(data: dict[str, Any], workers: int, dp_rank: int = 0, dp_size: int = 1, **kw: Any) -> BatchLoader:
    return BatchLoader(
        [Dataset.of(data["urls"])],
        data["tok"],
        BATCH,
        SAMPLE,
        seed=9,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=workers,
        **kw,
    )


def test_workers_are_readers_taken_round_robin(data: dict[str, Any]) -> None:
    got = take(loader(data, workers=2, dp_rank=1, dp_size=2), 12)
    readers = [
        PackedBatchStream(data["urls"], data["tok"], BATCH, SAMPLE, seed=9, reader=r, num_readers=4)
        for r in (2, 3)
    ]
    expected = [next(readers[k % 2]) for k in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # no workers / one worker: the same single reader
    one = PackedBatchStream(data["urls"], data["tok"], BATCH, SAMPLE, seed=9, reader=1, num_readers=2)
    expected = take(one, 6)
    for workers in (0, 1):
        got = take(loader(data, workers=workers, dp_rank=1, dp_size=2), 6)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_gives_the_uninterrupted_batches(data: dict[str, Any], workers: int) -> None:
    m = 5
    reference = loader(data, workers, dp_rank=0, dp_size=2)
    ref, states = [], {}
    for k in range(34):
        if k in (0, 1, 4, 7, 26):
            states[k] = json.loads(json.dumps(reference.state_dict()))  # plain python types only
        ref.append(next(reference))
    reference.close()
    for k, state in states.items():
        resumed = loader(data, workers, dp_rank=0, dp_size=2)
        resumed.load_state_dict(state)
        got = take(resumed, m)
        resumed.close()
        assert all(torch.equal(a, b) for a, b in zip(got, ref[k : k + m], strict=True)), k


def test_resume_refuses_another_worker_count(data: dict[str, Any]) -> None:
    a = loader(data, workers=2)
    next(a)
    with pytest.raises(ValueError, match="data.num_workers=2"):
        loader(data, workers=1).load_state_dict(a.state_dict())
    a.close()
    with pytest.raises(ValueError, match="dp_size=1"):
        loader(data, workers=2, dp_size=2).load_state_dict(a.state_dict())


def test_every_document_once_per_epoch_across_ranks_workers_and_a_resume(data: dict[str, Any]) -> None:
    dp_size, workers = 2, 2
    readers = dp_size * workers
    seen: list[str] = []
    for dp_rank in range(dp_size):
        first = loader(data, workers, dp_rank, dp_size)
        batches = take(first, 7)  # interrupted mid-epoch ...
        resumed = loader(data, workers, dp_rank, dp_size)
        resumed.load_state_dict(first.state_dict())
        first.close()
        batches += take(resumed, 300)  # ... and resumed, well into the next epoch
        resumed.close()
        for local in range(workers):
            r = dp_rank * workers + local
            # reader r owns shards r, r + readers, ... of each epoch's shuffled order; all hold 10 documents
            n_docs = DOCS_PER_SHARD * len(range(r, N_DOCS // DOCS_PER_SHARD, readers))
            own = [t for b in batches[local::workers] for t in b.flatten().tolist()]  # round-robin
            ids = doc_ids(own, data["tok"])
            assert len(ids) > n_docs  # the stream went on into epoch 1
            seen += ids[:n_docs]
    assert sorted(seen) == [f"doc{i:04d}" for i in range(N_DOCS)]  # none twice, none skipped


def test_error_counts_cover_handed_out_batches(data: dict[str, Any], tmp_path) -> None:
    (tmp_path / "garbage.tar").write_bytes(b"not a tar" * 100)
    urls = [*data["urls"], str(tmp_path / "garbage.tar")]
    ldr = BatchLoader([Dataset.of(urls)], data["tok"], BATCH, SAMPLE, seed=9, num_workers=2)
    assert ldr.errors == {"shards_skipped": 0, "samples_skipped": 0}
    for _ in itertools.islice(ldr, 200):  # both readers pass their epoch 0
        pass
    ldr.close()
    assert ldr.errors["shards_skipped"] >= 1 and ldr.errors["samples_skipped"] == 0


@pytest.mark.parametrize(
    ("old", "new"), [((2, 2), (1, 1)), ((2, 2), (3, 1)), ((1, 2), (2, 2)), ((2, 1), (1, 3))]
)
def test_resharded_resume_reads_every_document_once(data: dict[str, Any], old, new) -> None:
    """(dp, workers) -> (dp', workers'): documents read before + after the change = every document once."""
    (dp, w), (dp2, w2) = old, new
    seen: list[str] = []
    states = {}
    for rank in range(dp):
        ldr = loader(data, w, rank, dp)
        batches = take(ldr, 3 + 2 * rank)  # readers at different positions, some mid-shard
        ldr.close()
        states[rank] = json.loads(json.dumps(ldr.state_dict()))
        for local in range(w):
            seen += doc_ids([t for b in batches[local::w] for t in b.flatten().tolist()], data["tok"])
    epochs = {c["epoch"] for st in states.values() for r in st["readers"].values() for c in r["cursors"]}
    assert epochs == {0}  # all still in epoch 0: the rest of it is what the new readers must read
    for rank in range(dp2):
        ldr = loader(data, w2, rank, dp2)
        ldr.load_resharded(states)
        for local, st in ldr._states.items():
            plan = st["cursors"][0]["plan"]["0"]
            # what is left of epoch 0 for it: the documents that start in its buffer and in its planned shards
            n_docs = len(doc_ids(st["cursors"][0]["buffer"], data["tok"]))
            n_docs += sum(DOCS_PER_SHARD - start for _, start in plan)
            stream = ldr.spec.stream(local)
            stream.load_state_dict(st)
            own: list[int] = []
            while len(doc_ids(own, data["tok"])) <= n_docs and stream.cursors[0]["epoch"] == 0:
                own += next(stream).flatten().tolist()
            seen += doc_ids(own, data["tok"])[:n_docs]
    assert sorted(seen) == [f"doc{i:04d}" for i in range(N_DOCS)]  # none twice, none skipped
