"""The documents every data test reads: 60 id-tagged texts in 6 shards, as text and pre-tokenized."""

from __future__ import annotations

import random
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from mtp_pretrain.data.shards import write_shards
from mtp_pretrain.data.stream import PackedBatchStream
from mtp_pretrain.data.tokenizer import load_tokenizer, train_tokenizer

N_DOCS, DOCS_PER_SHARD = 60, 10  # => 6 shards
EOS, PAD = 0, 1


def make_texts(n: int, tag: str = "doc") -> list[str]:
    rng = random.Random(1234)
    words = ["def", "return", "self", "value", "élan", "x", "for", "in", "range", "None", "🐍", "(", ")", ":"]
    # every document starts with its id; a few long ones span several batches, most are short
    return [
        f"{tag}{i:04d} " + " ".join(rng.choice(words) for _ in range(rng.choice([3, 10, 40, 300]))) + "\n"
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("stream")
    texts = make_texts(N_DOCS)
    tok_path = root / "tokenizer.json"
    train_tokenizer(texts, 320, tok_path)
    docs = [{"key": f"doc{i:03d}", "text": t, "meta": {"i": i}} for i, t in enumerate(texts)]
    urls = [str(p) for p in write_shards(docs, root / "shards", max_docs_per_shard=DOCS_PER_SHARD)]
    tok_urls = [
        str(p)
        for p in write_shards(
            docs, root / "tokens", max_docs_per_shard=DOCS_PER_SHARD, tokenizer_path=tok_path
        )
    ]
    tok = load_tokenizer(tok_path)
    per_shard = {
        u: [
            t
            for d in docs[j * DOCS_PER_SHARD : (j + 1) * DOCS_PER_SHARD]
            for t in tok.encode(d["text"], add_special_tokens=False).ids + [EOS]
        ]
        for j, u in enumerate(urls)
    }
    return {"root": root, "urls": urls, "tok_urls": tok_urls, "tok": tok_path, "per_shard": per_shard}


def take(stream: PackedBatchStream, k: int) -> list[torch.Tensor]:
    return [next(stream) for _ in range(k)]


def flat(batches: list[torch.Tensor]) -> list[int]:
    return [t for b in batches for t in b.flatten().tolist()]


def doc_ids(tokens: list[int], tok_path: Path) -> list[str]:
    """Ids of the documents (split at EOS) in a token stream: the documents' leading tag."""
    tok, ids, part = load_tokenizer(tok_path), [], []
    for t in [*tokens, EOS]:
        if t != EOS:
            part.append(t)
            continue
        if m := re.match(r"([a-z]+\d{4}) ", tok.decode([x for x in part if x != PAD])):
            ids.append(m[1])
        part = []
    return ids


def docs_of(data: dict[str, Any], url: str) -> list[list[int]]:
    """The token ids (each ending in EOS) of the documents of shard ``url`` of the ``data`` fixture, in order."""
    docs, part = [], []
    for t in data["per_shard"][url]:
        part.append(t)
        if t == EOS:
            docs.append(part)
            part = []
    return docs


def kept_before(shard: Path, cut: int) -> int:
    """How many samples of ``shard`` a copy cut after ``cut`` bytes keeps: those followed by a whole header of
    the next sample within the cut (the sample being read at the cut is dropped, as it may lack members)."""
    with tarfile.open(shard) as tf:
        firsts = {}  # key -> header offset of its first member
        for m in tf.getmembers():
            firsts.setdefault(m.name.split(".", 1)[0], m.offset)
    return sum(1 for off in list(firsts.values())[1:] if off + 512 <= cut)
