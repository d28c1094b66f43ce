"""Offline byte-level BPE tokenizer (HF ``tokenizers``), saved as a single ``tokenizer.json``.

Ids 0 and 1 are always the special tokens ``EOS_TOKEN`` and ``PAD_TOKEN``. There is no normalizer and no
prefix space, so ``decode(encode(text)) == text`` for any string. Special-token strings that occur
*inside* a document are encoded as ordinary bytes (``encode_special_tokens``), so a document that contains
the literal text ``<|endoftext|>`` can never inject an EOS id.

:func:`transformers_files` gives the same tokenizer to Hugging Face transformers (mtp-export): the same ids for
any text, special-token strings included.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)

_HOW_TO_BUILD = (
    "build one with mtp_pretrain.data.tokenizer.train_tokenizer(...) "
    "or mtp_pretrain.data.corpus.prepare_corpus(...)"
)


def _configure(tok: Tokenizer) -> Tokenizer:
    # Treat special-token text inside documents as plain text; EOS is only ever added by the packer.
    tok.encode_special_tokens = True
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` and save it atomically to ``out_path``.

    ``out_path`` is the ``tokenizer.json`` file, or a directory in which ``tokenizer.json`` is written.
    The result is deterministic for the same texts (in the same order) and vocab size.
    """
    n_base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < n_base:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {n_base}")
    out = Path(out_path)
    if out.is_dir():
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # first => ids 0, 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable, no <unk>
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    _configure(tok)
    if tok.token_to_id(EOS_TOKEN) != 0 or tok.token_to_id(PAD_TOKEN) != 1:  # pragma: no cover
        raise RuntimeError("special tokens did not get ids 0 and 1")

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tokenizer.", suffix=".tmp")
    os.close(fd)
    try:
        tok.save(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (or a directory containing one) written by :func:`train_tokenizer`."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {p}; {_HOW_TO_BUILD}")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:
        raise ValueError(
            f"cannot load tokenizer {p} (corrupt or not a tokenizers JSON file: {e}); "
            f"delete it and {_HOW_TO_BUILD}"
        ) from e
    if tok.token_to_id(EOS_TOKEN) is None:
        raise ValueError(f"tokenizer {p} has no {EOS_TOKEN!r} token; {_HOW_TO_BUILD}")
    return _configure(tok)


def _special_id(tok: Tokenizer, token: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise ValueError(f"tokenizer has no special token {token!r}")
    return i


def eos_id(tok: Tokenizer) -> int:
    return _special_id(tok, EOS_TOKEN)


def pad_id(tok: Tokenizer) -> int:
    return _special_id(tok, PAD_TOKEN)


def transformers_files(tokenizer_json: str, model_max_length: int) -> dict[str, str]:
    """The files (name -> text) that load tokenizer ``tokenizer_json`` into transformers
    (``AutoTokenizer`` / ``PreTrainedTokenizerFast``) with this module's encoding and decoding of any text.

    ``encode_special_tokens`` is not stored in ``tokenizer.json``, and transformers' fast tokenizers set it on
    every call from their ``split_special_tokens`` option (default false: ``<|endoftext|>`` in a prompt would
    become the EOS id). So the config turns that option on: special tokens are only the markers the model or
    generation adds (EOS, padding), never matched in text. Honoured from transformers 4.42 (fast tokenizers);
    the file format needs tokenizers >= 0.20, i.e. transformers >= 4.45. ``clean_up_tokenization_spaces`` is
    off (older transformers default it on) so that ``decode`` returns the text exactly: the clean-up drops the
    space in ``" ."``, ``" 's"``...
    """
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": EOS_TOKEN,  # documents are separated by EOS only: it also starts generation
        "pad_token": PAD_TOKEN,
        "model_max_length": model_max_length,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2)}


def tokenizer_hash(path: str | Path) -> str:
    """First 16 hex chars of the sha256 of the tokenizer file's bytes."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
