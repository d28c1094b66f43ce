from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from mtp_pretrain.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    eos_id,
    load_tokenizer,
    pad_id,
    tokenizer_hash,
    train_tokenizer,
)

TRAIN_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    'class Foo:\n    """Docstring."""\n\n    def __init__(self, x: int) -> None:\n        self.x = x\n',
    "for i in range(10):\n\tprint(f'{i:03d}')  # comment\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(main())\n",
] * 20

ROUND_TRIP = [
    "",
    "def f(x):\n    return x ** 2\n",
    "# -*- coding: utf-8 -*-\ns = 'héllo wörld — ünïcödé ✓'\n",
    "名前 = '日本語のテキスト'  # CJK\n",
    "emoji = '🐍🚀 \U0001f9ea'\r\nwindows_line = True\r\n",
    "tabs\tand  double  spaces   \n\n\n   trailing   ",
    "null\x00byte and \x7f del and \u200b zero-width",
    "text containing <|endoftext|> and <|pad|> literally",
    "    " * 50 + "deep_indent = 1\n",
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(TRAIN_TEXTS, 400, path)
    return path


def test_special_ids(tok_path: Path) -> None:
    tok = load_tokenizer(tok_path)
    assert eos_id(tok) == 0 and pad_id(tok) == 1
    assert tok.id_to_token(0) == EOS_TOKEN and tok.id_to_token(1) == PAD_TOKEN
    assert tok.get_vocab_size() <= 400


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok_path: Path, text: str) -> None:
    tok = load_tokenizer(tok_path)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_token_text_in_document_is_not_special(tok_path: Path) -> None:
    tok = load_tokenizer(tok_path)
    ids = tok.encode("a <|endoftext|> b <|pad|>", add_special_tokens=False).ids
    assert 0 not in ids and 1 not in ids


def test_trained_tokenizer_compresses(tok_path: Path) -> None:
    tok = load_tokenizer(tok_path)
    text = TRAIN_TEXTS[1]
    assert len(tok.encode(text).ids) < len(text.encode()) / 2


def test_deterministic_and_hash(tmp_path: Path, tok_path: Path) -> None:
    other = train_tokenizer(iter(TRAIN_TEXTS), 400, tmp_path)  # directory => tokenizer.json inside
    assert isinstance(other, Tokenizer)
    assert (tmp_path / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    h = tokenizer_hash(tok_path)
    assert h == hashlib.sha256(tok_path.read_bytes()).hexdigest()[:16]
    assert len(h) == 16 and int(h, 16) >= 0
    assert tokenizer_hash(tmp_path) == h
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # no temp files left


def test_different_vocab_differs(tmp_path: Path, tok_path: Path) -> None:
    train_tokenizer(TRAIN_TEXTS, 300, tmp_path / "t.json")
    assert tokenizer_hash(tmp_path / "t.json") != tokenizer_hash(tok_path)


def test_vocab_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TRAIN_TEXTS, 100, tmp_path / "t.json")


def test_load_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)) as ei:
        load_tokenizer(missing)
    assert "train_tokenizer" in str(ei.value)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json


def test_load_corrupt(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=str(bad)):
        load_tokenizer(bad)
