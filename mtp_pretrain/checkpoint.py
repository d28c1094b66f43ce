"""Checkpoint storage: atomic step directories, verified before use, and the `latest` marker. What goes in
them, from which parts, is checkpoint_manager.py's business; this module stores dicts and the engine's files.

Layout of one checkpoint (one directory per step under `<run_dir>/checkpoints/`):
    step_00000100/
        <engine files>                        model + optimizer, sharded (megatron: dist_checkpointing,
                                              reshardable across TP/PP/DP; deepspeed: deepspeed/)
        trainer.pt                            state shared by all ranks (step, schedule, every DP rank's
                                              data-loader position, config, tokenizer, versions)
        rank_00000.pt ...                     per-rank state (RNG streams)
        mtp_checkpoint.json                   written last inside the directory: files and sizes
    latest                                    name of the newest complete checkpoint, replaced atomically

A save goes to a hidden temporary directory that is renamed into place only after every rank finished and
mtp_checkpoint.json lists what was written; `latest` is updated after that. A crash mid-save therefore leaves
the previous checkpoint loadable, and a directory without valid metadata is never loaded.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Callable
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import torch

from mtp_pretrain.errors import EXIT_CHECKPOINT, MTPError
from mtp_pretrain.parallel import barrier, rank, world_size
from mtp_pretrain.processes import die_with_parent

FORMAT_VERSION = 1
_LATEST = "latest"
_TMP_PREFIX = ".tmp-"


class CheckpointError(MTPError, RuntimeError):
    """A checkpoint that is missing, partial, corrupt or does not fit this run."""

    exit_code = EXIT_CHECKPOINT


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _describe_files(ckpt: Path) -> dict[str, int]:
    return {
        str(p.relative_to(ckpt)): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != "mtp_checkpoint.json"
    }


def verify(ckpt: Path) -> dict:
    """Metadata of a complete checkpoint, or CheckpointError saying what is wrong with it."""
    meta_path = ckpt / "mtp_checkpoint.json"
    if not meta_path.is_file():
        raise CheckpointError(
            f"{ckpt}: no mtp_checkpoint.json — a partial or foreign checkpoint; it is not loaded"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise CheckpointError(f"{ckpt}/mtp_checkpoint.json is corrupt ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{ckpt}/mtp_checkpoint.json is corrupt (no 'files' table)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: format version {meta.get('format_version')} != {FORMAT_VERSION}")
    for name, size in meta["files"].items():
        f = ckpt / name
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"{ckpt}: file {name} is missing or truncated (expected {size} bytes)")
    return meta


_manager: SyncManager | None = None


def _results_queue_dies_with_us() -> None:
    """megatron's torch_dist writer reports through a queue served by a multiprocessing Manager that it
    spawns on the first save and never stops; when the trainer is SIGKILLed (OOM killer, preemption) that
    server lives on, holding the job's stdout/stderr. Start the server ourselves, tied to our life."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        _manager.start(initializer=die_with_parent)
        filesystem_async._results_queue = _manager.Queue()


class Checkpointer:
    """Saves and finds checkpoints under `root`, keeping the newest `keep_last`."""

    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def save(
        self, step: int, write: Callable[[Path], None], common: dict[str, Any], per_rank: dict[str, Any]
    ) -> Path:
        """Checkpoint ``step``: ``write(directory)`` (collective) writes the engine's sharded model and
        optimizer state; ``common`` (rank 0) and ``per_rank`` go next to it. Three steps, each a point a
        crash may hit (tests/faults.py kills the process at each): write into a hidden directory, commit it
        (manifest, rename into place), then point `latest` at it."""
        final = self.root / step_dir_name(step)
        tmp = self._write(final, write, common, per_rank)
        if rank() == 0:
            self._commit(tmp, final, step)
            self._mark_latest(final)
        barrier()
        return final

    def _write(
        self, final: Path, write: Callable[[Path], None], common: dict[str, Any], per_rank: dict[str, Any]
    ) -> Path:
        tmp = self.root / f"{_TMP_PREFIX}{final.name}"
        if rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{_TMP_PREFIX}*"):  # left by a crash during an earlier save
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
            tmp.mkdir()
        barrier()
        _results_queue_dies_with_us()
        write(tmp)
        torch.save(per_rank, tmp / f"rank_{rank():05d}.pt")
        if rank() == 0:
            torch.save(common, tmp / "trainer.pt")
        barrier()  # every rank's files are on disk
        return tmp

    def _commit(self, tmp: Path, final: Path, step: int) -> None:
        """Rank 0: the manifest of what was written, then the directory renamed into place (atomic)."""
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size(),
            "files": _describe_files(tmp),
        }
        _atomic_write_text(tmp / "mtp_checkpoint.json", json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _mark_latest(self, final: Path) -> None:
        _atomic_write_text(self.root / _LATEST, final.name)
        self._retain()

    def _retain(self) -> None:
        """Delete all but the newest keep_last complete checkpoints; never the one `latest` names."""
        latest = (self.root / _LATEST).read_text().strip()
        done = sorted(p for p in self.root.glob("step_*") if (p / "mtp_checkpoint.json").is_file())
        for old in done[: -self.keep_last]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest valid checkpoint: the one `latest` names, else the newest that verifies."""
        marker = self.root / _LATEST
        candidates = []
        if marker.is_file():
            candidates.append(self.root / marker.read_text().strip())
        candidates += [p for p in sorted(self.root.glob("step_*"), reverse=True) if p not in candidates]
        for c in candidates:
            try:
                verify(c)
                return c
            except CheckpointError as e:
                if rank() == 0:
                    print(f"checkpoint: skipping {c.name}: {e}")
        return None

    @staticmethod
    def checked(ckpt: Path) -> dict:
        """The metadata of ``ckpt`` if it is a complete checkpoint (see :func:`verify`), else CheckpointError."""
        if not ckpt.is_dir():
            raise CheckpointError(f"checkpoint {ckpt} does not exist (give a step_XXXXXXXX directory)")
        return verify(ckpt)

    @staticmethod
    def read_common(ckpt: Path) -> dict:
        """The state shared by all ranks (trainer.pt) of a verified checkpoint; tensors and plain data only."""
        Checkpointer.checked(ckpt)
        return torch.load(ckpt / "trainer.pt", weights_only=True)

    @staticmethod
    def load(ckpt: Path) -> tuple[dict, dict | None]:
        """(common state, this rank's state or None if the world size changed) of a verified checkpoint;
        the engine loads its own files (``engine.load(ckpt)``)."""
        meta = Checkpointer.checked(ckpt)
        common = torch.load(ckpt / "trainer.pt", weights_only=True)
        rank_file = ckpt / f"rank_{rank():05d}.pt"
        per_rank = torch.load(rank_file, weights_only=True) if meta["world_size"] == world_size() else None
        return common, per_rank
