"""Checkpoints: atomic save, verification (sizes, checksums), fallback past broken ones, retention, bit-exact
load."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing

from mtp_pretrain import checkpoint
from mtp_pretrain.build import build_model
from mtp_pretrain.checkpoint import Checkpointer, CheckpointError, file_digest, step_dir_name, verify
from mtp_pretrain.config import HEAD_TYPES, ModelConfig, MTPConfig, OptimConfig
from mtp_pretrain.engine.megatron import MegatronEngine
from mtp_pretrain.model.mtp_model import transformer_config
from mtp_pretrain.rng import get_rng_state

MODEL = ModelConfig(preset="ckpt-test", num_layers=3, hidden_size=32, num_attention_heads=2, seq_len=16)
MTP = MTPConfig(n=2)
VOCAB, BATCH = 256, 2


def _model(seed: int):
    return build_model(MODEL, MTP, VOCAB, transformer_config(MODEL, MTP), seed=seed)


@pytest.fixture(scope="module")
def model(dist_world):
    return _model(0)


def _writer(sharded: dict):
    return lambda directory: dist_checkpointing.save(sharded, str(directory))


def _read(path, model) -> tuple[dict, dict, dict | None]:
    common, per_rank = Checkpointer.load(path)
    return dist_checkpointing.load(model.sharded_state_dict(), str(path)), common, per_rank


def _save(ck: Checkpointer, step: int, model) -> Path:
    return ck.save(
        step,
        _writer(model.sharded_state_dict()),
        common={"trainer": {"step": step}, "note": f"saved at {step}"},
        per_rank={"rank_value": torch.tensor([step, 7]), "rng": get_rng_state()},
    )


def _steps(root) -> list[str]:
    return sorted(p.name for p in root.glob("step_*"))


def test_save_writes_step_dir_latest_and_metadata(model, tmp_path):
    ck = Checkpointer(tmp_path / "ckpt", keep_last=2)
    path = _save(ck, 5, model)
    assert path == tmp_path / "ckpt" / step_dir_name(5) == tmp_path / "ckpt" / "step_00000005"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000005"
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".tmp-")]
    meta = verify(path)
    assert meta["step"] == 5 and meta["world_size"] == 1
    assert meta["format_version"] == 2 and meta["checksum"] == {"algorithm": "sha256", "mode": "all"}
    files = meta["files"]
    assert {"trainer.pt", "rank_00000.pt"} <= set(files)
    assert any(name.endswith(".distcp") for name in files)  # megatron's own dist_checkpointing files too
    for name, entry in files.items():  # mode "all": every file has its size and checksum
        assert entry == {"size": (path / name).stat().st_size, "sha256": file_digest(path / name)}, name
    assert ck.latest() == path


def test_latest_is_none_without_checkpoints(tmp_path):
    assert Checkpointer(tmp_path / "nothing").latest() is None
    (tmp_path / "empty").mkdir()
    assert Checkpointer(tmp_path / "empty").latest() is None


def _biggest_file(ckpt):
    return max(
        (p for p in ckpt.rglob("*") if p.is_file() and p.name != "mtp_checkpoint.json"),
        key=lambda p: p.stat().st_size,
    )


def test_truncated_file_fails_verify_and_latest_falls_back(model, tmp_path, capsys):
    ck = Checkpointer(tmp_path, keep_last=5)
    first = _save(ck, 1, model)
    second = _save(ck, 2, model)
    assert ck.latest() == second
    victim = _biggest_file(second)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(CheckpointError) as err:
        verify(second)
    assert str(victim.relative_to(second)) in str(err.value)
    capsys.readouterr()
    assert ck.latest() == first  # `latest` names the broken one: skipped
    out, err = capsys.readouterr()
    skipped = [line for line in err.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and second.name in skipped[0]  # reported once, on stderr
    assert "skipping" not in out  # stdout is mtp-generate's text
    with pytest.raises(CheckpointError):
        Checkpointer.load(second)


def test_missing_metadata_makes_a_directory_invalid(model, tmp_path):
    ck = Checkpointer(tmp_path, keep_last=5)
    first = _save(ck, 1, model)
    second = _save(ck, 2, model)
    (second / "mtp_checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="mtp_checkpoint.json"):
        verify(second)
    assert ck.latest() == first


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[]", b'{"format_version": 1}'])
def test_corrupt_metadata_is_a_checkpoint_error(model, tmp_path, content):
    ck = Checkpointer(tmp_path, keep_last=5)
    first = _save(ck, 1, model)
    second = _save(ck, 2, model)
    (second / "mtp_checkpoint.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="mtp_checkpoint.json"):
        verify(second)
    assert ck.latest() == first


def test_unfinished_save_is_never_loaded_and_is_cleaned(model, tmp_path):
    ck = Checkpointer(tmp_path, keep_last=5)
    first = _save(ck, 1, model)
    # A crash mid-save: the hidden directory holds a complete-looking copy (even valid metadata).
    crashed = tmp_path / ".tmp-step_00000002"
    shutil.copytree(first, crashed)
    older_crash = tmp_path / ".tmp-step_00000009"  # from some earlier run, another step
    shutil.copytree(first, older_crash)
    verify(crashed)
    assert ck.latest() == first

    second = _save(ck, 2, model)
    assert ck.latest() == second
    assert not crashed.exists() and not older_crash.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_retention_keeps_newest_and_the_latest(model, tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        _save(ck, step, model)
    assert _steps(tmp_path) == ["step_00000003", "step_00000004"]
    # Resumed from an earlier point (e.g. the run went back to step 2): `latest` names an older step.
    _save(ck, 2, model)
    assert (tmp_path / "latest").read_text() == "step_00000002"
    assert _steps(tmp_path) == ["step_00000002", "step_00000003", "step_00000004"]
    assert ck.latest() == tmp_path / "step_00000002"
    Checkpointer(tmp_path, keep_last=1).save(
        1, _writer(model.sharded_state_dict()), common={}, per_rank={}
    )  # the newest (4) and the latest (1) stay
    assert _steps(tmp_path) == ["step_00000001", "step_00000004"]
    assert ck.latest() == tmp_path / "step_00000001"


def test_load_round_trips_model_and_dicts_without_pickled_code(model, tmp_path):
    ck = Checkpointer(tmp_path)
    path = _save(ck, 3, model)
    other = _model(1)
    before = {k: v for k, v in other.state_dict().items() if not k.endswith("_extra_state")}
    ref = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert any(not torch.equal(before[k], ref[k]) for k in ref)  # really different weights

    state, common, per_rank = _read(path, other)
    other.load_state_dict(state)
    after = {k: v for k, v in other.state_dict().items() if not k.endswith("_extra_state")}
    assert after.keys() == ref.keys()
    for k in ref:  # a load returns the saved bytes: exact
        assert torch.equal(after[k], ref[k]), k
    assert common == {"trainer": {"step": 3}, "note": "saved at 3"}
    assert torch.equal(per_rank["rank_value"], torch.tensor([3, 7]))
    assert set(per_rank["rng"]) >= {"python", "numpy", "torch", "tracker"}
    # weights_only: plain tensors and containers, loadable without unpickling code
    assert torch.load(path / "trainer.pt", weights_only=True) == common
    assert torch.load(path / "rank_00000.pt", weights_only=True).keys() == per_rank.keys()


def test_load_with_another_world_size_drops_per_rank_state(model, tmp_path):
    path = _save(Checkpointer(tmp_path), 1, model)
    meta_path = path / "mtp_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["world_size"] = 2
    meta_path.write_text(json.dumps(meta))
    state, common, per_rank = _read(path, _model(1))
    assert per_rank is None and common["trainer"]["step"] == 1 and state


# -- checksums -------------------------------------------------------------------------------------


def _flip_byte(path: Path) -> None:
    """Corrupt ``path`` in the middle, keeping its size (what a size check cannot see)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _distcp(ckpt: Path) -> Path:
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("victim", ["trainer.pt", "rank_00000.pt", "distcp"])
def test_same_size_corruption_is_found_naming_file_and_fix(model, tmp_path, victim):
    ck = Checkpointer(tmp_path, keep_last=5)
    first = _save(ck, 1, model)
    second = _save(ck, 2, model)
    f = _distcp(second) if victim == "distcp" else second / victim
    size = f.stat().st_size
    _flip_byte(f)
    assert f.stat().st_size == size
    for check in (verify, Checkpointer.load):
        with pytest.raises(CheckpointError) as err:
            check(second)
        message = str(err.value)
        assert "\n" not in message and str(second) in message and f.name in message and "corrupt" in message
        assert f"trainer.resume={first}" in message  # the fix: the checkpoint before it


def test_parsed_mode_hashes_all_but_tensor_shards(model, tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep_last=5, checksum="parsed")
    path = _save(ck, 1, model)
    meta = json.loads((path / "mtp_checkpoint.json").read_text())
    assert meta["checksum"] == {"algorithm": "sha256", "mode": "parsed"}
    hashed = {name for name, entry in meta["files"].items() if "sha256" in entry}
    shards = {name for name in meta["files"] if name.endswith(".distcp")}
    assert shards and not hashed & shards
    assert hashed == set(meta["files"]) - shards  # trainer.pt, rank_*.pt, common.pt, .metadata, json
    assert {"trainer.pt", "rank_00000.pt", "common.pt", ".metadata", "metadata.json"} <= hashed

    read: list[str] = []
    real_digest = checkpoint.file_digest
    monkeypatch.setattr(checkpoint, "file_digest", lambda p: read.append(p.name) or real_digest(p))
    _flip_byte(_distcp(path))  # a tensor shard: size-checked only, by choice
    verify(path)
    assert sorted(read) == sorted(hashed)  # the shards were not even read
    _flip_byte(path / "trainer.pt")
    with pytest.raises(CheckpointError, match="trainer.pt is corrupt"):
        verify(path)


def test_unchanged_checkpoint_is_hashed_once_per_process(model, tmp_path, monkeypatch):
    path = _save(Checkpointer(tmp_path), 1, model)
    calls = []
    real = checkpoint.file_digests
    monkeypatch.setattr(checkpoint, "file_digests", lambda paths: calls.append(len(paths)) or real(paths))
    verify(path)
    Checkpointer.load(path)  # resume verifies again: answered from the cache
    assert len(calls) == 1
    _flip_byte(path / "rank_00000.pt")  # rewriting changes mtime (and here the inode): hashed again
    with pytest.raises(CheckpointError, match="rank_00000.pt is corrupt"):
        verify(path)
    assert len(calls) == 2


def _as_format_1(ckpt: Path) -> None:
    """Rewrite the manifest as a format-1 one (sizes only) as written before checksums."""
    meta_path = ckpt / "mtp_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    files = {name: entry["size"] for name, entry in meta["files"].items()}
    meta_path.write_text(
        json.dumps({"format_version": 1, "step": meta["step"], "world_size": 1, "files": files})
    )


def test_format_1_checkpoint_still_loads_by_size(model, tmp_path):
    path = _save(Checkpointer(tmp_path), 3, model)
    _as_format_1(path)
    assert verify(path)["format_version"] == 1
    state, common, per_rank = _read(path, _model(1))
    assert common["trainer"] == {"step": 3} and per_rank is not None and state
    # no checksums: bytes that do not parse are still refused before use, in one line
    (path / "trainer.pt").write_bytes(b"\0" * (path / "trainer.pt").stat().st_size)
    verify(path)
    with pytest.raises(CheckpointError, match=r"trainer.pt cannot be read \(") as err:
        Checkpointer.load(path)
    assert "\n" not in str(err.value)


def test_unknown_format_version_is_refused(model, tmp_path):
    path = _save(Checkpointer(tmp_path), 1, model)
    meta_path = path / "mtp_checkpoint.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format_version": 3}))
    with pytest.raises(CheckpointError, match="format version 3"):
        verify(path)


def test_rank_1_checks_sizes_and_adopts_rank_0s_verdict(model, tmp_path, monkeypatch):
    """Under torch.distributed only rank 0 hashes; every rank raises the same error (simulated rank 1 of 2;
    the real collectives run in tests/integration)."""
    path = _save(Checkpointer(tmp_path), 1, model)
    _flip_byte(path / "trainer.pt")  # rank 0 would find this; rank 1 reads no bytes
    monkeypatch.setattr(checkpoint, "_collective", lambda: True)
    monkeypatch.setattr(checkpoint, "rank", lambda: 1)
    monkeypatch.setattr(checkpoint, "world_size", lambda: 2)
    monkeypatch.setattr(checkpoint, "file_digests", lambda paths: pytest.fail("rank 1 hashed"))
    rank_0 = [None]

    def all_gather_object(out: list, obj) -> None:
        out[:] = [rank_0[0], obj]

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    assert Checkpointer.checked(path)["step"] == 1  # rank 0 passed
    rank_0[0] = "step_1: file trainer.pt is corrupt"
    with pytest.raises(CheckpointError, match="^step_1: file trainer.pt is corrupt$"):
        Checkpointer.checked(path)


# -- engine round trip ------------------------------------------------------------------------------


def _engine(seed: int, head_type: str = "parallel") -> MegatronEngine:
    mtp = replace(MTP, head_type=head_type)
    tconfig = transformer_config(MODEL, mtp)
    return MegatronEngine(
        build_model(MODEL, mtp, VOCAB, tconfig, seed=seed), tconfig, OptimConfig(warmup_steps=1), 10
    )


def _step(engine: MegatronEngine, tokens: torch.Tensor):
    return engine.train_step(
        iter([(tokens, torch.ones_like(tokens, dtype=torch.bool))]), 1, MODEL.seq_len, BATCH
    )


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_engine_resume_is_bit_identical(dist_world, tmp_path, head_type):
    g = torch.Generator().manual_seed(123)
    batches = [torch.randint(0, VOCAB, (BATCH, MODEL.seq_len + MTP.n), generator=g) for _ in range(3)]
    original = _engine(0, head_type)
    for tokens in batches[:2]:
        assert not _step(original, tokens).skipped
    ck = Checkpointer(tmp_path)
    path = ck.save(2, original.save, common={"engine": original.state_dict()}, per_rank={})

    resumed = _engine(1, head_type)  # other initial weights, fresh optimizer and schedule
    common, _ = Checkpointer.load(ck.latest())
    resumed.load(ck.latest())
    resumed.load_state_dict(common["engine"])
    assert ck.latest() == path

    # exact: the same kernels in this process on the same weights, Adam state and schedule, all restored
    a, b = _step(original, batches[2]), _step(resumed, batches[2])
    assert a.loss == b.loss and a.lr == b.lr and a.grad_norm == b.grad_norm
    assert torch.equal(a.head_stats.packed(), b.head_stats.packed())
    params_a = dict(original.model.module.named_parameters())
    params_b = dict(resumed.model.module.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name, p in params_a.items():
        assert torch.equal(p, params_b[name]), name
