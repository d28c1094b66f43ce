"""Checkpoint storage: atomic step directories, verified before use, and the `latest` marker. What goes in
them, from which parts, is checkpoint_manager.py's business; this module stores dicts and the engine's files.

Layout of one checkpoint (one directory per step under `<run_dir>/checkpoints/`):
    step_00000100/
        <engine files>                        model + optimizer, sharded (megatron: dist_checkpointing,
                                              reshardable across TP/PP/DP; deepspeed: deepspeed/)
        trainer.pt                            state shared by all ranks (step, schedule, every DP rank's
                                              data-loader position, config, tokenizer, versions)
        rank_00000.pt ...                     per-rank state (RNG streams)
        mtp_checkpoint.json                   written last inside the directory: files, sizes, checksums
    latest                                    name of the newest complete checkpoint, replaced atomically

A save goes to a hidden temporary directory that is renamed into place only after every rank finished and
mtp_checkpoint.json lists what was written; `latest` is updated after that. A crash mid-save therefore leaves
the previous checkpoint loadable, and a directory without valid metadata is never loaded.

Verification (before any use: resume, init_from, export, generation) checks every listed file's size and,
where the manifest has one, its SHA-256 (`trainer.checkpoint_checksum`: "all" files, or "parsed" = all but
the engine's large tensor shards, which are then checked by size). Format 1 manifests (sizes only) still load.
Under torch.distributed rank 0 reads and hashes, every rank checks sizes, and all ranks adopt one verdict;
a process re-verifying an unchanged checkpoint (same files, sizes, mtimes, inodes) does not hash it again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any, TypeVar

import torch

from mtp_pretrain.errors import EXIT_CHECKPOINT, MTPError
from mtp_pretrain.parallel import barrier, rank, world_size
from mtp_pretrain.processes import die_with_parent

FORMAT_VERSION = 2  # 2: per-file checksums; 1: sizes only (still read, so older runs resume)
_READABLE_VERSIONS = (1, 2)
_MANIFEST = "mtp_checkpoint.json"
_LATEST = "latest"
_TMP_PREFIX = ".tmp-"
T = TypeVar("T")
HASH = "sha256"  # hashlib's OpenSSL sha256 uses the CPU's SHA extensions: faster than blake2b here
CHECKSUM_MODES = ("all", "parsed")
# The engine's large tensor shards, size-checked only under checkpoint_checksum=parsed: torch DCP data files
# (megatron dist_checkpointing) and DeepSpeed's model / optimizer states. Everything else is parsed by us
# or by the engine's loader as metadata (trainer.pt, rank_*.pt, common.pt, .metadata, *.json): hashed.
_TENSOR_SHARDS = ("*.distcp", "*_model_states.pt", "*_optim_states.pt")
_CHUNK = 4 << 20  # bytes per read: large enough that hashing, not Python, dominates
_HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib and file reads release the GIL


class CheckpointError(MTPError, RuntimeError):
    """A checkpoint that is missing, partial, corrupt or does not fit this run."""

    exit_code = EXIT_CHECKPOINT


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_tensor_shard(name: str) -> bool:
    """Whether checkpoint file ``name`` is one of the engine's large tensor shards (see _TENSOR_SHARDS)."""
    return any(fnmatch.fnmatch(Path(name).name, pattern) for pattern in _TENSOR_SHARDS)


def file_digest(path: Path) -> str:
    """The hex SHA-256 of the file at ``path``, read in _CHUNK pieces into one reused buffer."""
    h = hashlib.new(HASH)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_digests(paths: list[Path]) -> list[str]:
    """:func:`file_digest` of each path, files hashed in parallel threads."""
    if len(paths) <= 1:
        return [file_digest(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(paths))) as pool:
        return list(pool.map(file_digest, paths))


def _describe_files(ckpt: Path, checksum: str) -> dict[str, dict[str, Any]]:
    """The manifest's file table: size of every file, and its digest unless mode "parsed" skips it."""
    names = [str(p.relative_to(ckpt)) for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != _MANIFEST]
    files: dict[str, dict[str, Any]] = {n: {"size": (ckpt / n).stat().st_size} for n in names}
    hashed = [n for n in names if checksum == "all" or not is_tensor_shard(n)]
    for name, digest in zip(hashed, file_digests([ckpt / n for n in hashed]), strict=True):
        files[name][HASH] = digest
    return files


def _fix(ckpt: Path) -> str:
    """What to do about a broken checkpoint: the newest complete-looking one before it, or deleting it."""
    earlier = [
        p for p in sorted(ckpt.parent.glob("step_*")) if p.name < ckpt.name and (p / _MANIFEST).is_file()
    ]
    if earlier:
        return f"resume from an earlier checkpoint (trainer.resume={earlier[-1]}) or delete {ckpt}"
    return f"delete {ckpt} (there is no earlier checkpoint beside it) or give another checkpoint"


def _manifest(ckpt: Path) -> tuple[dict, dict[str, tuple[int, str | None]]]:
    """(metadata, {file: (size, digest or None)}) of ``ckpt``'s manifest, or CheckpointError."""
    meta_path = ckpt / _MANIFEST
    if not meta_path.is_file():
        raise CheckpointError(f"{ckpt}: no {_MANIFEST} — a partial or foreign checkpoint; it is not loaded")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise CheckpointError(f"{meta_path} is corrupt ({e}); {_fix(ckpt)}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{meta_path} is corrupt (no 'files' table); {_fix(ckpt)}")
    version = meta.get("format_version")
    if type(version) is not int or version not in _READABLE_VERSIONS:  # not bool: true == 1
        raise CheckpointError(
            f"{ckpt}: checkpoint format version {version!r}, this mtp-pretrain reads "
            f"{', '.join(map(str, _READABLE_VERSIONS))}; load it with the version that wrote it"
        )
    files: dict[str, tuple[int, str | None]] = {}
    for name, entry in meta["files"].items():
        if version == 1 and isinstance(entry, int):
            files[name] = (entry, None)
        elif version >= 2 and isinstance(entry, dict) and isinstance(entry.get("size"), int):
            digest = entry.get(HASH)
            files[name] = (entry["size"], digest if isinstance(digest, str) else None)
        else:
            raise CheckpointError(f"{meta_path} is corrupt (bad entry for {name!r}); {_fix(ckpt)}")
    return meta, files


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


# checkpoint directory -> the stat keys of its manifest and files when they last passed the checksums
_verified: dict[str, tuple] = {}


def _verify(ckpt: Path, hashes: bool = True) -> dict:
    meta, files = _manifest(ckpt)
    keys = [("", _stat_key(ckpt / _MANIFEST))]
    for name, (size, _) in files.items():
        f = ckpt / name
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(
                f"{ckpt}: file {name} is missing or truncated (expected {size} bytes); {_fix(ckpt)}"
            )
        keys.append((name, _stat_key(f)))
    fingerprint = tuple(keys)
    cache_key = str(ckpt.resolve())
    if not hashes or _verified.get(cache_key) == fingerprint:
        return meta
    hashed = sorted(name for name, (_, digest) in files.items() if digest is not None)
    try:
        digests = file_digests([ckpt / n for n in hashed])
    except OSError as e:  # unreadable (permissions, I/O error): as unusable as a corrupt file
        raise CheckpointError(f"{ckpt}: {e}; {_fix(ckpt)}") from e
    for name, digest in zip(hashed, digests, strict=True):
        if digest != files[name][1]:
            raise CheckpointError(
                f"{ckpt}: file {name} is corrupt (its {HASH} differs from the one in {_MANIFEST}); {_fix(ckpt)}"
            )
    _verified[cache_key] = fingerprint
    return meta


def verify(ckpt: Path) -> dict:
    """Metadata of a complete, intact checkpoint (every listed file present at its size and, where the
    manifest has a checksum, with that checksum), else CheckpointError saying what is wrong and what to do.
    This process only; an unchanged checkpoint that passed before is not hashed again."""
    return _verify(ckpt)


def _collective() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def on_every_rank(work: Callable[[], T]) -> T:
    """``work()`` on this rank; under torch.distributed a CheckpointError on any rank is raised on every rank
    (the first rank's, one all_gather of its message), so that no rank goes on into a collective alone."""
    result, local = None, None
    try:
        result = work()
    except CheckpointError as e:
        local = e
    if not _collective():
        if local is not None:
            raise local
        return result  # type: ignore[return-value]
    every: list[str | None] = [None] * world_size()
    torch.distributed.all_gather_object(every, None if local is None else str(local))
    error = next((e for e in every if e is not None), None)
    if error is None:
        return result  # type: ignore[return-value]
    raise local if local is not None and str(local) == error else CheckpointError(error)


def _torch_load(ckpt: Path, name: str) -> dict:
    """A dict saved with torch.save in a verified checkpoint; a file that does not parse as one (another
    version's pickled objects, a corruption a size-only manifest missed) is a CheckpointError."""
    try:
        state = torch.load(ckpt / name, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ...: whatever the bytes hit
        why = (str(e).splitlines() or [""])[0][:120]  # torch's messages run to paragraphs
        raise CheckpointError(
            f"{ckpt}: {name} cannot be read ({type(e).__name__}: {why}); {_fix(ckpt)}"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt}: {name} holds a {type(state).__name__}, not a dict; {_fix(ckpt)}")
    return state


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

    def __init__(self, root: str | Path, keep_last: int = 2, checksum: str = "all") -> None:
        if checksum not in CHECKSUM_MODES:
            raise ValueError(f"checksum={checksum!r}: use one of {', '.join(CHECKSUM_MODES)}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.checksum = checksum  # "all" | "parsed": which files the manifest hashes

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
        """Rank 0: the manifest of what was written (sizes, checksums), then the directory renamed into
        place (atomic)."""
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size(),
            # which files carry a checksum: all, or all but the tensor shards (see is_tensor_shard)
            "checksum": {"algorithm": HASH, "mode": self.checksum},
            "files": _describe_files(tmp, self.checksum),
        }
        _atomic_write_text(tmp / _MANIFEST, json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _mark_latest(self, final: Path) -> None:
        _atomic_write_text(self.root / _LATEST, final.name)
        self._retain()

    def _retain(self) -> None:
        """Delete all but the newest keep_last complete checkpoints; never the one `latest` names."""
        latest = (self.root / _LATEST).read_text().strip()
        done = sorted(p for p in self.root.glob("step_*") if (p / _MANIFEST).is_file())
        for old in done[: -self.keep_last]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest valid checkpoint: the one `latest` names, else the newest that verifies; a broken
        one is skipped with a notice on stderr. Collective under torch.distributed: rank 0 chooses."""
        chosen = self._newest_valid() if rank() == 0 else None
        if _collective():
            box = [chosen]
            torch.distributed.broadcast_object_list(box, src=0)
            chosen = box[0]
        return chosen

    def _newest_valid(self) -> Path | None:
        candidates = []
        try:
            named = (self.root / _LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):  # absent, or garbage: the directories speak for themselves
            named = ""
        if named.startswith("step_"):
            candidates.append(self.root / named)
        candidates += [p for p in sorted(self.root.glob("step_*"), reverse=True) if p not in candidates]
        for c in candidates:
            try:
                verify(c)
                return c
            except CheckpointError as e:
                print(f"checkpoint: skipping {c.name}, falling back to an earlier one: {e}", file=sys.stderr)
        return None

    @staticmethod
    def checked(ckpt: Path) -> dict:
        """The metadata of ``ckpt`` if it is a complete, intact checkpoint (see :func:`verify`), else
        CheckpointError. Collective under torch.distributed: rank 0 also hashes, every rank checks sizes,
        and all ranks raise the same error or none."""

        def check() -> dict:
            if not ckpt.is_dir():
                raise CheckpointError(f"checkpoint {ckpt} does not exist (give a step_XXXXXXXX directory)")
            return _verify(ckpt, hashes=rank() == 0 or not _collective())

        return on_every_rank(check)

    @staticmethod
    def read_common(ckpt: Path) -> dict:
        """The state shared by all ranks (trainer.pt) of a verified checkpoint; tensors and plain data only.
        Collective under torch.distributed, like :meth:`checked`."""
        Checkpointer.checked(ckpt)
        return on_every_rank(lambda: _torch_load(ckpt, "trainer.pt"))

    @staticmethod
    def load(ckpt: Path) -> tuple[dict, dict | None]:
        """(common state, this rank's state or None if the world size changed) of a verified checkpoint;
        the engine loads its own files (``engine.load(ckpt)``). Collective under torch.distributed."""
        meta = Checkpointer.checked(ckpt)

        def read() -> tuple[dict, dict | None]:
            common = _torch_load(ckpt, "trainer.pt")
            same_world = meta["world_size"] == world_size()
            return common, _torch_load(ckpt, f"rank_{rank():05d}.pt") if same_world else None

        return on_every_rank(read)
