"""mtp-eval: per-head held-out metrics equal the trainer's validation; JSON, table and clear errors."""

import json
import math

import pytest

from mtp_pretrain.errors import EXIT_DATA
from mtp_pretrain.inference.cli import evaluate as evaluate_cli
from mtp_pretrain.inference.evaluate import heldout_metrics, read_batches, run_validation_data


def test_heldout_metrics_equal_the_trainers_validation(mtp_run):
    """Same shards, same packing, same masks (this run masks document boundaries): the same numbers."""
    trainer = mtp_run.trainer
    expected = trainer.validate()  # trainer.val_batches batches of micro_batch_size rows
    datasets, mask, field = run_validation_data(mtp_run.loaded)
    assert mask is True
    t = trainer.cfg.trainer
    batches = read_batches(mtp_run.loaded, datasets, t.val_batches, t.micro_batch_size, field)
    got = heldout_metrics(mtp_run.loaded, batches, mask)
    for i in range(1, 5):
        # mean fp32 cross-entropy of the same <=768 targets (2 batches x 8 rows x 48) by two implementations
        # (megatron's model + vocab-parallel loss vs the plain-torch decoder): only fp32 rounding order
        # differs, ~sqrt(768) ~ 30 ulps (~2e-6 relative); 1e-5 (~170 ulps) is that with headroom
        assert got[f"loss/head{i}"] == pytest.approx(expected[f"loss/head{i}"], rel=1e-5)
        # the same top-1 hits over the same count: only the ratio's rounding may differ (no argmax flip)
        assert got[f"acc/head{i}"] == pytest.approx(expected[f"acc/head{i}"], abs=1e-6)
        assert got[f"ppl/head{i}"] == math.exp(got[f"loss/head{i}"])  # computed from that very loss
        assert got[f"tokens/head{i}"] > 0
    assert got["loss/head1"] < got["loss/head4"]  # the far head has the harder job


def test_cli_writes_json_and_a_table(mtp_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    evaluate_cli(
        [
            str(mtp_run.checkpoint),
            "--batches",
            "2",
            "--batch-size",
            "4",
            "--prompts",
            "4",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "16",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert set(result["heads"]) >= {f"{k}/head{i}" for k in ("loss", "ppl", "acc") for i in range(1, 5)}
    d = result["decoding"]
    assert d["identical_to_greedy"] is True and d["speculative"] is True and d["tokens_per_forward"] > 1.0
    assert set(d["acceptance_per_head"]) == {"head2", "head3", "head4"}
    printed = capsys.readouterr().out
    assert "head  loss    ppl       acc" in printed and "tokens/forward" in printed


def test_cli_names_bad_shards_and_export_without_data(mtp_run, tmp_path, capsys):
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(SystemExit) as exit_:
        evaluate_cli([str(mtp_run.checkpoint), "--data", str(tmp_path / "missing.tar"), "--prompts", "0"])
    assert exit_.value.code == EXIT_DATA and "not found" in capsys.readouterr().err
    from mtp_pretrain.cli import export

    export([str(mtp_run.checkpoint), "--out", str(tmp_path / "hf")])
    with pytest.raises(SystemExit) as exit_:
        evaluate_cli([str(tmp_path / "hf"), "--prompts", "0"])
    assert exit_.value.code == 2 and "name the held-out shards with --data" in capsys.readouterr().err
