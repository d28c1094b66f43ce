"""The inference decoder computes the training model's logits, for every head, with and without the cache."""

import pytest
import torch

from mtp_pretrain.checkpoint import CheckpointError
from mtp_pretrain.cli import export
from mtp_pretrain.inference.weights import load_model, resolve
from tests.numerics import assert_same_logits


def _tokens(vocab: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_every_head_matches_the_training_model(mtp_run):
    dec = mtp_run.loaded.decoder
    tokens = _tokens(dec.cfg.vocab_size, (3, dec.cfg.context))
    ours = dec(tokens)  # [n, B, T, V]
    model = mtp_run.trainer.engine.module.eval()
    theirs = model.head_logits(tokens)  # n x [T, B, V_padded]
    assert ours.shape[0] == len(theirs) == 4
    for i, t in enumerate(theirs):
        assert_same_logits(ours[i], t.transpose(0, 1)[..., : dec.cfg.vocab_size])


def test_export_and_run_dir_load_the_same_weights(mtp_run, tmp_path):
    export([str(mtp_run.checkpoint), "--out", str(tmp_path / "hf")])
    from_export = load_model(tmp_path / "hf").decoder.state_dict()
    from_run = load_model(mtp_run.checkpoint.parent.parent)  # the run dir: its newest checkpoint
    assert from_run.source == mtp_run.checkpoint
    for name, t in mtp_run.loaded.decoder.state_dict().items():  # copies of the same fp32 values: exact
        assert torch.equal(t, from_export[name]) and torch.equal(t, from_run.decoder.state_dict()[name]), name


def test_what_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither an mtp-export directory"):
        resolve(tmp_path)
