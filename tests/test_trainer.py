"""End-to-end: the trainer learns, validates, checkpoints, and a resumed run continues the same curve."""

import shutil

import torch

from mtp_pretrain.trainer import Trainer
from tests.conftest import compose_config, tiny_run_overrides


def test_train_resume_continues_identical_curve(dist_world, synthetic_source, tmp_path):
    cache = tmp_path / "cache"
    full = Trainer(compose_config(*tiny_run_overrides(synthetic_source, cache, tmp_path / "full"))).fit()
    assert full.step == 6 and len(full.losses) == 6
    assert full.losses[-1] < full.losses[0]  # it learns
    assert set(full.val) >= {"loss", "loss/head1", "loss/head2", "acc/head1", "acc/head2"}
    assert full.checkpoint is not None and full.checkpoint.name == "step_00000006"

    # A run that stopped after its step-3 checkpoint (copied, as if step 4+ never happened) and resumes.
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", part / "step_00000003")
    (part / "latest").write_text("step_00000003")
    resumed = Trainer(compose_config(*tiny_run_overrides(synthetic_source, cache, tmp_path / "part"))).fit()
    assert resumed.step == 6 and len(resumed.losses) == 3
    assert resumed.losses == full.losses[3:]  # bit-identical continuation
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
