from __future__ import annotations

import hashlib
import json
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
    transformers_files,
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

# Text that must reach transformers as it reaches training: literal special-token strings stay bytes, and
# decode gives the text back (transformers' clean-up would turn " ." into ".").
PARITY = [
    *ROUND_TRIP,
    EOS_TOKEN,
    f"a{EOS_TOKEN}b",
    f"{EOS_TOKEN}{EOS_TOKEN}{PAD_TOKEN}",
    f" {PAD_TOKEN} \n{EOS_TOKEN}\n",
    "<|endoftext|",
    "it 's a test . don't , ok ? ( x ) !",
    "\n\n\n",
    "   ",
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


def test_transformers_files_keep_special_text_as_bytes(tok_path: Path) -> None:
    """At the tokenizers level (what transformers' fast tokenizer runs): the exported config makes the backend
    encode as ours does; without it, literal special-token text would become the special ids."""
    files = transformers_files(tok_path.read_text(), 64)
    assert files["tokenizer.json"] == tok_path.read_text()
    config = json.loads(files["tokenizer_config.json"])
    assert config["clean_up_tokenization_spaces"] is False and config["model_max_length"] == 64
    ours = load_tokenizer(tok_path)
    backend = Tokenizer.from_str(files["tokenizer.json"])
    assert backend.token_to_id(config["eos_token"]) == 0 and backend.token_to_id(config["pad_token"]) == 1
    backend.encode_special_tokens = False  # transformers' default: the bug this config avoids
    assert backend.encode(f"a{EOS_TOKEN}b", add_special_tokens=False).ids[1] == 0
    backend.encode_special_tokens = config["split_special_tokens"]  # what transformers sets on every call
    for text in PARITY:
        assert (
            backend.encode(text, add_special_tokens=False).ids
            == ours.encode(text, add_special_tokens=False).ids
        )


def test_transformers_tokenizer_matches_ours(
    tok_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local directory: nothing may be fetched
    transformers = pytest.importorskip("transformers")
    export = tmp_path / "export"
    export.mkdir()
    for name, text in transformers_files(tok_path.read_text(), 64).items():
        (export / name).write_text(text)
    (export / "config.json").write_text('{"model_type": "llama"}')  # as in an export: AutoTokenizer reads it
    ours = load_tokenizer(tok_path)
    first = transformers.AutoTokenizer.from_pretrained(export)
    first.save_pretrained(tmp_path / "resaved")  # a user's save_pretrained keeps the behaviour
    (tmp_path / "resaved" / "config.json").write_text('{"model_type": "llama"}')
    loaded = [first, transformers.PreTrainedTokenizerFast.from_pretrained(export)]
    loaded.append(transformers.AutoTokenizer.from_pretrained(tmp_path / "resaved"))
    batch_ids = [ours.encode(text, add_special_tokens=False).ids for text in PARITY]
    for tok in loaded:
        assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
        assert tok(PARITY)["input_ids"] == batch_ids  # batched, and special tokens added: none but ours
        for text, ids in zip(PARITY, batch_ids, strict=True):
            assert tok.encode(text, add_special_tokens=False) == ids, text
            assert tok.convert_tokens_to_ids(tok.tokenize(text)) == ids, text
            assert tok.decode(ids) == text and tok.decode(ids, skip_special_tokens=True) == text
            assert tok.decode([*ids, 0], skip_special_tokens=True) == text  # EOS: a marker only
