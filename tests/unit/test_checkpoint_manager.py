"""CheckpointManager.restore on broken checkpoints: an explicit corrupt resume fails in one line, resume=auto
falls back past a corrupt checkpoint (notice on stderr), and a checkpoint that verifies but holds the wrong
contents is a CheckpointError, never a raw traceback. The engine is a stub: only the files matter here."""

import collections
import json
import os
from pathlib import Path

import pytest
import torch

from mtp_pretrain.checkpoint import CheckpointError, file_digest
from mtp_pretrain.checkpoint_manager import CheckpointManager, TrainState
from mtp_pretrain.config import Config, ModelConfig, TrainerConfig


class StubEngine:
    """Writes one "tensor shard" as the real engines do and records what it was asked to load."""

    def __init__(self) -> None:
        self.loaded: list[Path] = []
        self.schedule = 0

    def state_dict(self) -> dict:
        return {"schedule": self.schedule}

    def load_state_dict(self, state: dict) -> None:
        self.schedule = state["schedule"]

    def save(self, directory: Path) -> None:
        (directory / "__0_0.distcp").write_bytes(os.urandom(1 << 16))

    def load(self, directory: Path) -> None:
        self.loaded.append(directory)


class Box:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _manager(tmp_path: Path, resume: str = "auto") -> tuple[CheckpointManager, StubEngine, TrainState]:
    tokenizer = tmp_path / "tokenizer.json"
    if not tokenizer.exists():
        tokenizer.write_text('{"model": "stub"}')
    cfg = Config(
        model=ModelConfig(preset="stub", num_layers=2, hidden_size=8, num_attention_heads=2, seq_len=8),
        trainer=TrainerConfig(run_dir=str(tmp_path / "run"), resume=resume, keep_last=5),
    )
    engine, state = StubEngine(), TrainState()
    return CheckpointManager(cfg, engine, {"trainer": state}, {"rng": Box()}, tokenizer), engine, state


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Path]:
    """A run dir with checkpoints at steps 1 and 2."""
    manager, engine, state = _manager(tmp_path)
    paths = []
    for step in (1, 2):
        state.step, engine.schedule = step, 10 * step
        paths.append(manager.save(step))
    return paths[0], paths[1]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _replace_verified(ckpt: Path, name: str, content: object) -> None:
    """Put ``content`` into ``ckpt/name`` and list it in the manifest: it passes verification."""
    if isinstance(content, bytes):
        (ckpt / name).write_bytes(content)
    else:
        torch.save(content, ckpt / name)
    meta_path = ckpt / "mtp_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["files"][name] = {"size": (ckpt / name).stat().st_size, "sha256": file_digest(ckpt / name)}
    meta_path.write_text(json.dumps(meta))


def test_explicit_resume_of_a_corrupt_checkpoint_fails_in_one_line(tmp_path, saved):
    first, second = saved
    _flip_byte(second / "trainer.pt")
    manager, engine, _ = _manager(tmp_path, resume=str(second))
    with pytest.raises(CheckpointError) as err:
        manager.restore()  # no fall-back: the user named this one
    message = str(err.value)
    assert "\n" not in message and f"{second}: file trainer.pt is corrupt" in message
    assert f"trainer.resume={first}" in message
    assert engine.loaded == []


def test_auto_resume_falls_back_to_the_previous_checkpoint(tmp_path, saved, capsys):
    first, second = saved
    _flip_byte(second / "__0_0.distcp")  # checkpoint_checksum=all (default): the engine's shards too
    manager, engine, state = _manager(tmp_path)
    capsys.readouterr()
    manager.restore()
    assert engine.loaded == [first] and state.step == 1 and engine.schedule == 10
    out, err = capsys.readouterr()
    assert f"skipping {second.name}" in err and "__0_0.distcp is corrupt" in err
    assert "skipping" not in out


def test_auto_resume_with_every_checkpoint_broken_does_not_start_over(tmp_path, saved):
    for ckpt in saved:
        _flip_byte(ckpt / "rank_00000.pt")
    manager, engine, _ = _manager(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint in .* passes verification"):
        manager.restore()
    assert engine.loaded == []


class Foreign:  # not loadable with weights_only=True: what a checkpoint pickling objects holds
    pass


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda common: {k: v for k, v in common.items() if k != "config"}, r"trainer.pt lacks 'config'"),
        (lambda common: {**common, "trainer": {"step": 2}}, r"part 'trainer' of trainer.pt does not load"),
        (lambda common: {**common, "config": "model: [1, 2"}, r"the config in trainer.pt does not load"),
        (lambda common: {**common, "note": Foreign()}, r"trainer.pt cannot be read \(UnpicklingError"),
        (lambda common: [1, 2], r"trainer.pt holds a list, not a dict"),
        (lambda common: b"garbage" * 100, r"trainer.pt cannot be read \("),
    ],
    ids=["no_config", "part_lacks_field", "config_not_yaml", "pickled_object", "not_a_dict", "not_torch"],
)
def test_verified_checkpoint_with_wrong_contents_is_a_checkpoint_error(tmp_path, saved, edit, expected):
    _, second = saved
    common = torch.load(second / "trainer.pt", weights_only=True)
    _replace_verified(second, "trainer.pt", edit(common))
    manager, _, _ = _manager(tmp_path, resume=str(second))
    with pytest.raises(CheckpointError, match=expected) as err:
        manager.restore()
    assert "\n" not in str(err.value)


def test_rank_file_without_a_rank_part_fails_before_the_engine_loads(tmp_path, saved):
    _, second = saved
    _replace_verified(second, "rank_00000.pt", collections.OrderedDict(other=1))
    manager, engine, _ = _manager(tmp_path, resume=str(second))
    with pytest.raises(CheckpointError, match=r"rank_00000.pt lacks 'rng'"):
        manager.restore()
    assert engine.loaded == []
