"""End-to-end: the trainer learns, validates, checkpoints, and a resumed run continues the same curve."""

import json
import shutil

import pytest
import torch
from megatron.core.dist_checkpointing.serialization import load_plain_tensors

from mtp_pretrain.checkpoint import CheckpointError
from mtp_pretrain.data.shards import iter_source_documents, write_shards
from mtp_pretrain.data.tokenizer import train_tokenizer
from mtp_pretrain.trainer import NonFiniteLossError, Trainer
from tests.conftest import compose_config, tiny_run_overrides


def _prebuilt_mix(source, root) -> dict[str, str]:
    """Two pre-built datasets (text shards and pre-tokenized shards) mixed 3:1, + validation shards."""
    docs = list(iter_source_documents([source]))
    train_tokenizer([d["text"] for d in docs], 300, root / "tokenizer.json")
    write_shards(docs[:25], root / "a", max_docs_per_shard=5)
    write_shards(docs[25:35], root / "b", max_docs_per_shard=3, tokenizer_path=root / "tokenizer.json")
    write_shards(docs[35:], root / "val", max_docs_per_shard=3)
    return {
        "data.datasets": f"[{{urls:['{root / 'a'}'],weight:3,name:code}},{{urls:['{root / 'b'}/shard-{{000000..000003}}.tar'],weight:1,name:tok}}]",
        "data.tokenizer": str(root / "tokenizer.json"),
        "data.val_urls": f"['{root / 'val'}']",
        "data.num_workers": 2,
        "data.mask_doc_boundaries": "true",
    }


@pytest.mark.parametrize("data", ["corpus", "prebuilt-mix", "deepspeed-zero2"])
def test_train_resume_continues_identical_curve(dist_world, synthetic_source, tmp_path, data):
    cache = tmp_path / "cache"
    extra = _prebuilt_mix(synthetic_source, tmp_path / "shards") if data == "prebuilt-mix" else {}
    if data == "deepspeed-zero2":  # the DeepSpeed engine's own sharded checkpoint inside ours
        extra = {"parallel.engine": "deepspeed", "parallel.zero_stage": 2, "trainer.grad_accum": 2}

    def config(run_dir):
        return compose_config(*tiny_run_overrides(synthetic_source, cache, run_dir, **extra))

    full = Trainer(config(tmp_path / "full")).fit()
    if data == "prebuilt-mix":  # both datasets were read, by both workers, about 3:1
        readers = torch.load(full.checkpoint / "trainer.pt", weights_only=True)["data"]["loaders"][0][
            "readers"
        ]
        assert len(readers) == 2
        counts = [sum(r["samples_per_dataset"][j] for r in readers.values()) for j in (0, 1)]
        assert counts[0] > counts[1] > 0
    assert full.step == 6 and len(full.losses) == 6
    assert full.losses[-1] < full.losses[0]  # it learns: ~11.4 -> ~10.7, far beyond any rounding
    assert set(full.val) >= {"loss", "loss/head1", "loss/head2", "acc/head1", "acc/head2"}
    assert full.checkpoint is not None and full.checkpoint.name == "step_00000006"

    # A run that stopped after its step-3 checkpoint (copied, as if step 4+ never happened) and resumes.
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", part / "step_00000003")
    (part / "latest").write_text("step_00000003")
    resumed = Trainer(config(tmp_path / "part")).fit()
    assert resumed.step == 6 and len(resumed.losses) == 3
    # exact: the same process, kernels and data order, and every state (weights, Adam, RNG, data position)
    # restored bit for bit, so the continuation is deterministic
    assert resumed.losses == full.losses[3:]
    assert resumed.head_losses == full.head_losses[3:]
    final_a = torch.load(full.checkpoint / "trainer.pt", weights_only=True)["trainer"]
    final_b = torch.load(resumed.checkpoint / "trainer.pt", weights_only=True)["trainer"]
    assert final_a == final_b


def test_run_dir_has_metrics_plot_and_retention(dist_world, synthetic_source, tmp_path):
    cache = tmp_path / "cache"
    overrides = tiny_run_overrides(
        synthetic_source, cache, tmp_path / "run", **{"trainer.save_every": 2, "trainer.keep_last": 2}
    )
    result = Trainer(compose_config(*overrides)).fit()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000004", "step_00000006"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000006"
    assert result.paths["plot"].endswith("loss_curves.png")
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size > 0


def _nan_at_step(trainer: Trainer, step: int) -> None:
    """Make the loss of optimizer step ``step`` (1-based) NaN on this rank."""

    def hook(_module, _inputs, output):
        if trainer.step == step - 1 and torch.is_grad_enabled():
            return output[0] * float("nan"), output[1]
        return output

    trainer.engine.module.register_forward_hook(hook)


def test_nonfinite_loss_skip_drops_the_update_and_counts(dist_world, synthetic_source, tmp_path):
    trainer = Trainer(
        compose_config(*tiny_run_overrides(synthetic_source, tmp_path / "cache", tmp_path / "run"))
    )
    _nan_at_step(trainer, 3)
    params = {}
    train_step = trainer.engine.train_step

    def recording(*args, **kw):
        before = [p.detach().clone() for p in trainer.engine.module.parameters()]
        lr_before = trainer.engine.optimizer.param_groups[0]["lr"]
        result = train_step(*args, **kw)
        after = list(trainer.engine.module.parameters())
        params[trainer.step + 1] = (
            all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
            lr_before,
            trainer.engine.optimizer.param_groups[0]["lr"],
            result.nonfinite,
        )
        return result

    trainer.engine.train_step = recording
    result = trainer.fit()
    assert result.nonfinite_steps == 1 and result.step == 6
    unchanged, lr_before, lr_after, nonfinite = params[3]
    assert nonfinite and unchanged and lr_after == lr_before  # no update, the schedule waits
    assert not any(params[s][0] for s in (2, 4, 5, 6)), (
        params
    )  # the others updated (step 1 runs at warm-up lr 0)
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in history if r["split"] == "train"] == [0, 0, 1, 1, 1, 1]


def test_nonfinite_loss_abort_exits_without_saving(dist_world, synthetic_source, tmp_path):
    overrides = tiny_run_overrides(
        synthetic_source, tmp_path / "cache", tmp_path / "run", **{"trainer.nonfinite": "abort"}
    )
    trainer = Trainer(compose_config(*overrides))
    _nan_at_step(trainer, 4)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss \(nan\) at step 4 \(trainer.nonfinite=abort\)"
    ):
        trainer.fit()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000003"  # nothing after it
    assert not (tmp_path / "run" / "checkpoints" / "step_00000004").exists()


def test_checkpoint_of_another_model_is_refused_naming_the_difference(dist_world, synthetic_source, tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    Trainer(compose_config(*tiny_run_overrides(synthetic_source, cache, run, **{"trainer.steps": 1}))).fit()
    for change, expected in [
        ({"model.hidden_size": 64}, r"model.hidden_size: checkpoint 32, this run 64"),
        ({"mtp.n": 1}, r"mtp.n: checkpoint 2, this run 1.*trainer.init_from"),
    ]:
        with pytest.raises(CheckpointError, match=expected):
            Trainer(compose_config(*tiny_run_overrides(synthetic_source, cache, run, **change)))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.pt").write_bytes(b"not ours")
    with pytest.raises(CheckpointError, match="no mtp_checkpoint.json"):
        Trainer(
            compose_config(
                *tiny_run_overrides(synthetic_source, cache, run, **{"trainer.resume": str(foreign)})
            )
        )


def test_init_from_an_n2_checkpoint_finetunes_with_n1(dist_world, synthetic_source, tmp_path):
    """The paper's n' = 1 finetune of an n-head model: the trunk and head 1 carry over, head 2 is dropped."""
    cache = tmp_path / "cache"
    base = Trainer(
        compose_config(*tiny_run_overrides(synthetic_source, cache, tmp_path / "n2", **{"trainer.steps": 3}))
    ).fit()
    overrides = {
        "mtp.n": 1,
        "model.num_layers": 2,
        "trainer.init_from": str(base.checkpoint),
        "trainer.steps": 2,
    }
    tuned = Trainer(
        compose_config(*tiny_run_overrides(synthetic_source, cache, tmp_path / "n1", **overrides))
    )
    assert tuned.step == 0
    saved = load_plain_tensors(str(base.checkpoint))
    model = tuned.engine.module
    got = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}  # copied weights: exact
    assert torch.equal(got["embedding.word_embeddings.weight"], saved["embedding.word_embeddings.weight"])
    assert torch.equal(
        got["heads.layers.0.mlp.linear_fc2.weight"], saved["heads.layers.0.mlp.linear_fc2.weight"]
    )
    assert torch.equal(
        got["decoder.layers.0.mlp.linear_fc2.weight"], saved["decoder.layers.mlp.linear_fc2.weight"][0]
    )
    result = tuned.fit()
    assert result.step == 2 and len(result.head_losses[0]) == 1
    with pytest.raises(
        CheckpointError, match=r"trunk blocks.*checkpoint 1, this run 2; set model.num_layers=2"
    ):
        bad = {**overrides, "model.num_layers": 3}
        Trainer(compose_config(*tiny_run_overrides(synthetic_source, cache, tmp_path / "n1b", **bad)))


def _train_records(run_dir) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == "train"}


def test_weight_schedule_is_logged_and_resumes_exactly(dist_world, synthetic_source, tmp_path):
    """mtp.weight_schedule=linear changes head 2's weight every step: the weights reach the loss, are logged as
    mtp_weight_k, and a run resumed from its step-3 checkpoint sets the uninterrupted run's weights."""
    cache = tmp_path / "cache"
    extra = {"mtp.weight_schedule": "linear", "mtp.weight_start": 1.0, "mtp.weight_end": 0.0}

    def config(run_dir):
        return compose_config(*tiny_run_overrides(synthetic_source, cache, run_dir, **extra))

    trainer = Trainer(config(tmp_path / "full"))
    assert trainer.mtp_losses and trainer.mtp_losses[0] is trainer.engine.module.loss_fn
    full = trainer.fit()
    records = _train_records(tmp_path / "full")
    # logged step s (1-based) ran at progress (s-1)/6: head 2 weighs 1 - (s-1)/6, head 1 stays 1
    assert [records[s]["mtp_weight_2"] for s in range(1, 7)] == [
        1.0 + (0.0 - 1.0) * (s / 6) for s in range(6)
    ]
    assert all(records[s]["mtp_weight_1"] == 1.0 for s in range(1, 7))
    for (
        r
    ) in records.values():  # the reported loss is the weighted sum of the head means: the weights reach it
        # 1e-5: the float32 per-head means and their weighted sum round independently
        assert r["loss"] == pytest.approx(r["loss/head1"] + r["mtp_weight_2"] * r["loss/head2"], rel=1e-5)
    assert trainer.mtp_losses[0].weights == (1.0, 1.0 - 5 / 6)  # the last step's

    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", part / "step_00000003")
    (part / "latest").write_text("step_00000003")
    resumed = Trainer(config(tmp_path / "part"))
    assert resumed.mtp_losses[0].weights == (1.0, 0.5)  # step 4's, set on restore
    result = resumed.fit()
    resumed_records = _train_records(tmp_path / "part")
    for s in (4, 5, 6):
        assert resumed_records[s]["mtp_weight_2"] == records[s]["mtp_weight_2"]
    assert result.losses == full.losses[3:]  # exact, as in the resume test above: same weights, same curve
