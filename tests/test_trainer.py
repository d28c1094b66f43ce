"""End-to-end: the trainer learns, validates, checkpoints, and a resumed run continues the same curve."""

import shutil

import pytest
import torch

from mtp_pretrain.data.shards import iter_source_documents, write_shards
from mtp_pretrain.data.tokenizer import train_tokenizer
from mtp_pretrain.trainer import Trainer
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


@pytest.mark.parametrize("data", ["corpus", "prebuilt-mix"])
def test_train_resume_continues_identical_curve(dist_world, synthetic_source, tmp_path, data):
    cache = tmp_path / "cache"
    extra = _prebuilt_mix(synthetic_source, tmp_path / "shards") if data == "prebuilt-mix" else {}

    def config(run_dir):
        return compose_config(*tiny_run_overrides(synthetic_source, cache, run_dir, **extra))

    full = Trainer(config(tmp_path / "full")).fit()
    if data == "prebuilt-mix":  # both datasets were read, by both workers, about 3:1
        readers = torch.load(full.checkpoint / "rank_00000.pt", weights_only=True)["data"]["readers"]
        assert len(readers) == 2
        counts = [sum(r["samples_per_dataset"][j] for r in readers.values()) for j in (0, 1)]
        assert counts[0] > counts[1] > 0
    assert full.step == 6 and len(full.losses) == 6
    assert full.losses[-1] < full.losses[0]  # it learns
    assert set(full.val) >= {"loss", "loss/head1", "loss/head2", "acc/head1", "acc/head2"}
    assert full.checkpoint is not None and full.checkpoint.name == "step_00000006"

    # A run that stopped after its step-3 checkpoint (copied, as if step 4+ never happened) and resumes.
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", part / "step_00000003")
    (part / "latest").write_text("step_00000003")
    resumed = Trainer(config(tmp_path / "part")).fit()
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
