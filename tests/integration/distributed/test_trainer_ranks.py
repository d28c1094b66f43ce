"""The trainer on several ranks (two torchrun launches: 4 ranks, then 2) and re-sharded resumes in this process."""

import json

import pytest
import torch

from mtp_pretrain.trainer import Trainer
from tests.conftest import compose_config
from tests.integration.distributed import trainer_ranks as script
from tests.launch import INTEGRATION, torchrun
from tests.numerics import EPS32, assert_same_logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_source):
    out = tmp_path_factory.mktemp("trainer_ranks")
    results = {}
    for world, mode in ((4, "save"), (2, "reshard")):
        proc = torchrun(
            world,
            INTEGRATION / "distributed" / "trainer_ranks.py",
            mode,
            str(out),
            str(synthetic_source),
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        results.update(json.loads((out / f"{mode}.json").read_text()))
    return out, results


def _losses(ranks: list[dict]) -> list[float]:
    found = [r["losses"] for r in ranks if r["last_stage"] and r["tp_rank"] == 0 and r["dp_rank"] == 0]
    assert len(found) == 1 and found[0]
    return found[0]


def test_tensor_parallel_peers_see_identical_batches_and_dp_ranks_differ(runs):
    by_dp = {}
    for r in runs[1]["tp2dp2"]:
        assert len(r["batches"]) == script.STEPS * 2  # grad_accum 2
        by_dp.setdefault(r["dp_rank"], []).append(r["batches"])
    assert sorted(by_dp) == [0, 1] and all(len(v) == 2 for v in by_dp.values())
    for peers in by_dp.values():
        assert peers[0] == peers[1]
    assert not set(by_dp[0][0]) & set(by_dp[1][0])  # disjoint shards => no shared batch


def test_resume_on_every_rank_continues_the_same_batches_and_losses(runs):
    k = script.RESUME_AT * 2
    for full, resumed in zip(runs[1]["tp2dp2"], runs[1]["resumed"], strict=True):
        assert resumed["batches"] == full["batches"][k:], (full["tp_rank"], full["dp_rank"])
        # bit-identical: the same layout resumed on the same machine, every state restored (see test_faults)
        assert resumed["losses"] == full["losses"][script.RESUME_AT :]
        assert full["val"]["loss/head1"] > 0 and resumed["val"] == full["val"]


def test_sigusr1_to_one_rank_stops_all_at_the_same_step_with_a_checkpoint(runs):
    usr1 = runs[1]["usr1"]
    assert {r["step"] for r in usr1} == {2}
    assert all(r["stopped"] for r in usr1) and any(r["stopped"] == "SIGUSR1" for r in usr1)
    assert {r["checkpoint"].rsplit("/", 1)[-1] for r in usr1} == {"step_00000002"}


def _diff(a: list[float], b: list[float]) -> float:
    """The largest relative difference of two loss curves, in fp32 eps."""
    assert len(a) == len(b) > 0
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)) / EPS32


def test_resume_on_another_layout_continues_the_loss(dist_world, runs, synthetic_source):
    """TP2xPP2 -> PP2 and TP2xDP2 -> TP1xDP2 (2 ranks), TP2xPP2 -> one process (here)."""
    out, results = runs
    ref = _losses(results["tp2pp2"])[script.RESUME_AT :]
    worst = {"tp2pp2 -> pp2": _diff(_losses(results["tp2pp2@pp2"]), ref)}
    worst["tp2dp2 -> tp1dp2"] = _diff(
        _losses(results["tp2dp2@dp2"]), _losses(results["tp2dp2"])[script.RESUME_AT :]
    )
    step3 = out / "tp2pp2" / "checkpoints" / f"step_{script.RESUME_AT:08d}"
    cfg = compose_config(
        *script.overrides(synthetic_source, out / "cache", out / "tp2pp2-at-1", **{"trainer.resume": step3})
    )
    worst["tp2pp2 -> 1"] = _diff(Trainer(cfg).fit().losses, ref)
    print("re-sharded resume, worst loss difference (fp32 eps, relative):", worst)
    # the same weights and Adam state in another TP x PP x DP layout: fp32 sums split differently, and Adam
    # steps from gradients reduced in another order, which move a loss only at second order (as in
    # test_layouts.py); bound 16 eps of the loss (~12), as there
    assert max(worst.values()) <= 16, worst


def test_resume_with_another_dp_size_redeals_the_data(dist_world, runs, synthetic_source, capsys):
    """TP2xDP2 -> one process: model and optimizer re-shard, the data position is re-dealt (see the rule in
    mtp_pretrain.data.reshard.reshard_states; its no-repeat/no-skip property is tests/data/test_loader.py's)."""
    out, results = runs
    step3 = out / "tp2dp2" / "checkpoints" / f"step_{script.RESUME_AT:08d}"
    cfg = compose_config(
        *script.overrides(synthetic_source, out / "cache", out / "tp2dp2-at-1", **{"trainer.resume": step3})
    )
    trainer = Trainer(cfg)
    assert "data readers changed (DP 2 x workers 2 -> DP 1 x workers 2)" in capsys.readouterr().out
    plans = [st["cursors"][0]["plan"] for st in trainer.train_data._states.values()]
    assert len(plans) == 2 and all(p for p in plans)  # both new readers got a share of the rest of the epoch
    result = trainer.fit()
    assert result.step == script.STEPS and all(x == x for x in result.losses)  # trains on (no NaN)


def test_generation_gathers_a_tp2pp2_checkpoint_into_one_process(dist_world, runs, synthetic_source):
    """mtp-generate's loader reads a TP2 x PP2 checkpoint directly: its decoder's logits, every head, equal
    those of the training model re-sharded into this process by dist_checkpointing."""
    from mtp_pretrain.inference.weights import load_model

    out, _ = runs
    step3 = out / "tp2pp2" / "checkpoints" / f"step_{script.RESUME_AT:08d}"
    cfg = compose_config(
        *script.overrides(synthetic_source, out / "cache", out / "tp2pp2-gen", **{"trainer.resume": step3})
    )
    model = Trainer(cfg).engine.module.eval()
    decoder = load_model(step3).decoder
    tokens = torch.randint(
        2, decoder.cfg.vocab_size, (2, decoder.cfg.context), generator=torch.Generator().manual_seed(0)
    )
    ours = decoder(tokens)
    for i, theirs in enumerate(model.head_logits(tokens)):
        assert_same_logits(ours[i], theirs.transpose(0, 1)[..., : decoder.cfg.vocab_size])
