from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from mtp_pretrain.data.shards import write_shards
from mtp_pretrain.data.stream import PackedBatchStream, ShardReadError
from mtp_pretrain.data.tokenizer import load_tokenizer, train_tokenizer

N_DOCS, DOCS_PER_SHARD = 60, 10  # => 6 shards


def make_texts(n: int) -> list[str]:
    rng = random.Random(1234)
    words = ["def", "return", "self", "value", "élan", "x", "for", "in", "range", "None", "🐍", "(", ")", ":"]
    # a few long documents span several batches; most are short
    return [" ".join(rng.choice(words) for _ in range(rng.choice([3, 10, 40, 300]))) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("stream")
    texts = make_texts(N_DOCS)
    tok_path = root / "tokenizer.json"
    train_tokenizer(texts, 320, tok_path)
    docs = [{"key": f"doc{i:03d}", "text": t, "meta": {"i": i}} for i, t in enumerate(texts)]
    urls = [str(p) for p in write_shards(docs, root / "shards", max_docs_per_shard=DOCS_PER_SHARD)]
    tok = load_tokenizer(tok_path)
    per_shard = {
        u: [
            t
            for d in docs[j * DOCS_PER_SHARD : (j + 1) * DOCS_PER_SHARD]
            for t in tok.encode(d["text"], add_special_tokens=False).ids + [0]
        ]
        for j, u in enumerate(urls)
    }
    return {"root": root, "urls": urls, "tok": tok_path, "per_shard": per_shard}


def take(stream: PackedBatchStream, k: int) -> list[torch.Tensor]:
    return [next(stream) for _ in range(k)]


def test_batch_shape_and_dtype(data: dict[str, Any]) -> None:
    s = PackedBatchStream(data["urls"], data["tok"], batch_size=3, seq_len=17)
    for b in take(s, 5):
        assert b.shape == (3, 17) and b.dtype == torch.long
    assert s.batches_yielded == 5
    assert iter(s) is s


@pytest.mark.parametrize("shuffle", [False, True])
def test_one_epoch_equals_concatenated_documents(data: dict[str, Any], shuffle: bool) -> None:
    seq = 13
    s = PackedBatchStream(
        data["urls"], data["tok"], batch_size=1, seq_len=seq, shuffle_shards=shuffle, loop=False, seed=7
    )
    order = s.epoch_shards(0)
    assert sorted(order) == sorted(data["urls"])
    if not shuffle:
        assert order == data["urls"]
    expected = [t for u in order for t in data["per_shard"][u]]
    got = [t for b in s for t in b.flatten().tolist()]
    assert len(got) == len(expected) // seq * seq
    assert got == expected[: len(got)]
    with pytest.raises(StopIteration):
        next(s)


def test_epochs_reshuffle_and_continue_stream(data: dict[str, Any]) -> None:
    s = PackedBatchStream(data["urls"], data["tok"], batch_size=2, seq_len=16, seed=3)
    orders = [s.epoch_shards(e) for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1
    n_tokens = sum(len(v) for v in data["per_shard"].values())
    expected = [t for o in orders for u in o for t in data["per_shard"][u]]
    n_batches = 3 * n_tokens // 32
    got = [t for b in take(s, n_batches) for t in b.flatten().tolist()]
    assert got == expected[: len(got)]  # no tokens dropped at epoch boundaries when looping
    assert s.epoch >= 2


def test_data_parallel_ranks_are_disjoint(data: dict[str, Any]) -> None:
    urls = data["urls"]
    for dp_size in (2, 3):
        for epoch in range(3):
            per_rank = [
                PackedBatchStream(urls, data["tok"], 1, 8, seed=5, dp_rank=r, dp_size=dp_size).epoch_shards(
                    epoch
                )
                for r in range(dp_size)
            ]
            flat = [u for shards in per_rank for u in shards]
            assert sorted(flat) == sorted(urls) and len(set(flat)) == len(urls)
    # each rank streams exactly its own shards
    for r in range(2):
        s = PackedBatchStream(urls, data["tok"], 1, 11, seed=5, dp_rank=r, dp_size=2, loop=False)
        expected = [t for u in s.epoch_shards(0) for t in data["per_shard"][u]]
        got = [t for b in s for t in b.flatten().tolist()]
        assert got == expected[: len(got)] and len(got) == len(expected) // 11 * 11


def test_resume_is_exact(data: dict[str, Any]) -> None:
    kw = dict(batch_size=2, seq_len=24, seed=11)
    ref_stream = PackedBatchStream(data["urls"], data["tok"], **kw)
    n_tokens = sum(len(v) for v in data["per_shard"].values())
    total = int(2.3 * n_tokens) // 48  # a bit more than two epochs
    ref, states = [], [ref_stream.state_dict()]
    for _ in range(total):
        ref.append(next(ref_stream))
        states.append(ref_stream.state_dict())
    m = 4
    positions = [(st["epoch"], st["shard_pos"]) for st in states]
    shard_change = [
        k
        for k in range(total - m)
        if positions[k][1] != positions[k + 1][1] and positions[k][0] == positions[k + 1][0]
    ]
    epoch_change = [k for k in range(total - m) if positions[k][0] != positions[k + m][0]]
    long_buffer = [k for k in range(total - m) if len(states[k]["buffer"]) >= 48]  # >1 batch pending
    assert shard_change and epoch_change and long_buffer
    ks = sorted(
        {0, 1, total - m - 1, *shard_change[:6], *epoch_change, *long_buffer[:3], *range(0, total - m, 9)}
    )
    for k in ks:
        b = PackedBatchStream(data["urls"], data["tok"], **kw)
        b.load_state_dict(json.loads(json.dumps(states[k])))  # plain python types only
        for j, batch in enumerate(take(b, m)):
            assert torch.equal(batch, ref[k + j]), (k, j)
        assert b.batches_yielded == k + m
    for k in (shard_change[0], epoch_change[0]):  # a separate run reports the same state
        a = PackedBatchStream(data["urls"], data["tok"], **kw)
        take(a, k)
        assert a.state_dict() == states[k]


def test_resume_from_saved_state_in_same_object(data: dict[str, Any]) -> None:
    s = PackedBatchStream(data["urls"], data["tok"], batch_size=1, seq_len=32, seed=2)
    take(s, 7)
    st = s.state_dict()
    after = take(s, 5)
    s.load_state_dict(st)
    assert all(torch.equal(x, y) for x, y in zip(take(s, 5), after, strict=True))


def test_resume_state_mismatch(data: dict[str, Any]) -> None:
    st = PackedBatchStream(data["urls"], data["tok"], 1, 8, dp_size=2).state_dict()
    with pytest.raises(ValueError, match="dp_size"):
        PackedBatchStream(data["urls"], data["tok"], 1, 8, dp_size=3).load_state_dict(st)


def test_construction_errors(data: dict[str, Any], tmp_path: Path) -> None:
    missing = str(tmp_path / "gone-000000.tar")
    with pytest.raises(FileNotFoundError, match="gone-000000.tar"):
        PackedBatchStream([*data["urls"], missing], data["tok"], 1, 8)
    with pytest.raises(ValueError, match="6 shard.*dp_size=7"):
        PackedBatchStream(data["urls"], data["tok"], 1, 8, dp_size=7)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        PackedBatchStream(data["urls"], tmp_path / "tokenizer.json", 1, 8)


def test_truncated_shard_raises_naming_it(data: dict[str, Any], tmp_path: Path) -> None:
    src = Path(data["urls"][1]).read_bytes()
    for cut in (len(src) // 2 + 100, 2048, 4096):  # anywhere, and at 512-byte block boundaries
        bad = tmp_path / f"broken-{cut}.tar"
        bad.write_bytes(src[:cut])
        s = PackedBatchStream(
            [str(data["urls"][0]), str(bad)], data["tok"], 1, 8, loop=False, shuffle_shards=False
        )
        with pytest.raises(ShardReadError, match=f"broken-{cut}.tar"):
            list(s)


def test_garbage_shard_raises_naming_it(data: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "garbage.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardReadError, match="garbage.tar"):
        next(PackedBatchStream([str(bad)], data["tok"], 1, 8))


def test_shards_without_documents_do_not_hang(data: dict[str, Any], tmp_path: Path) -> None:
    shard = tmp_path / "images.tar"
    with tarfile.open(shard, "w") as tf:
        info = tarfile.TarInfo("img0.jpg")
        info.size = 0
        tf.addfile(info)
    with pytest.raises(ValueError, match="no documents"):
        next(PackedBatchStream([str(shard)], data["tok"], 1, 8, loop=True))
