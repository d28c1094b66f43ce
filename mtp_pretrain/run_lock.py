"""One writer per run dir: the running job holds ``<run_dir>/.lock`` (global rank 0, a POSIX file lock).

A second job started on the same run dir would interleave checkpoints, metrics and the wandb run with the
first (e.g. a restarted job while orphaned ranks of the old one still train). The lock file's body names the
holder (host, pid, Slurm job, start time) so that the second job fails at start with one line saying who
to wait for. The kernel drops the lock when its holder dies, however it dies, so the lock of a job that
was killed is free; the next job takes it over and logs whose it was. The file itself stays (removing a
lock file races with a job opening it); a holder that ends cleanly empties it.

A POSIX lock (``fcntl.lockf``) rather than ``flock``: it belongs to the process, so the DataLoader workers
and the checkpoint writer's Manager that rank 0 forks do not inherit it (a flock lives on in every forked
copy of the descriptor and would outlast the release), and NFS supports it natively. Its one trap, that
closing any descriptor of the file drops it, does not arise: only this module opens the file, once per
process. On a filesystem without locks (a Lustre mount without ``flock``/``localflock``) the run goes on
unlocked after one warning. Rank 0 decides and the verdict is broadcast, so that every rank raises the
same error instead of waiting for rank 0 in the first collective.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from mtp_pretrain.errors import UsageError

LOCK_FILE = ".lock"
_BUSY = {errno.EAGAIN, errno.EACCES}
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held: dict[Path, list[int]] = {}  # lock path -> [fd, holders in this process, pid of this process]
_warned = False


class RunDirBusy(UsageError):
    """Another live job holds the run dir (exit status 2)."""


def holder_info() -> dict[str, object]:
    """Who this process is, as written into the lock file."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe(info: dict[str, object] | None) -> str:
    """``host H, pid P, Slurm job J, since T`` from a lock file's body (what is known of it)."""
    if not info:
        return "holder unknown (the lock file is empty)"
    parts = [f"host {info.get('host')}", f"pid {info.get('pid')}"]
    if info.get("slurm_job_id"):
        parts.append(f"Slurm job {info['slurm_job_id']}")
    if info.get("started"):
        parts.append(f"since {info['started']}")
    return ", ".join(parts)


def _read(fd: int) -> dict[str, object] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _lock_path(run_dir: Path) -> Path:
    # resolved: one key per file however it is named (a second descriptor of a POSIX-locked file in the
    # same process would drop the lock when closed)
    return Path(run_dir).resolve() / LOCK_FILE


def acquire(run_dir: Path) -> Path | None:
    """Take ``run_dir``'s lock for this process, or raise :class:`RunDirBusy` naming the holder.

    Re-entrant within a process (a later Trainer on the same run dir in one process is the same writer;
    :func:`release` is counted). Returns the lock file, or None where the filesystem has no file locks."""
    global _warned
    path = _lock_path(run_dir)
    if path in _held and _held[path][2] == os.getpid():
        _held[path][1] += 1
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(
            f"cannot create the run dir lock {path}: {e.strerror}; set trainer.run_dir to a writable directory"
        ) from e
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read(fd) if e.errno in _BUSY else None
        os.close(fd)
        if e.errno in _BUSY:
            raise RunDirBusy(
                f"run dir {path.parent} is in use by another job ({describe(holder)}): wait for it to end, "
                f"stop it, or set trainer.run_dir to another directory"
            ) from e
        if e.errno in _UNSUPPORTED:
            if not _warned:
                print(
                    f"warning: {path.parent}: the filesystem does not support file locks ({e.strerror}): "
                    f"nothing stops a second job from writing into this run dir",
                    file=sys.stderr,
                    flush=True,
                )
                _warned = True
            return None
        raise
    previous = _read(fd)
    if previous:  # a holder that ends cleanly empties the file: this one died holding the lock
        print(
            f"run dir {path.parent}: taking over the lock of a job that is gone ({describe(previous)})",
            file=sys.stderr,
            flush=True,
        )
    body = (json.dumps(holder_info()) + "\n").encode()
    os.pwrite(fd, body, 0)
    os.ftruncate(fd, len(body))
    _held[path] = [fd, 1, os.getpid()]
    return path


def release(run_dir: Path) -> None:
    """Give up this process's hold on ``run_dir`` (the lock goes when the last holder here releases)."""
    path = _lock_path(run_dir)
    if path not in _held:
        return
    fd, count, pid = _held[path]
    if pid != os.getpid():  # a forked copy of the holder (it does not hold the lock): touch nothing
        del _held[path]
        return
    if count > 1:
        _held[path][1] -= 1
        return
    del _held[path]
    try:
        os.ftruncate(fd, 0)  # empty: the next job does not take this for a dead holder's lock
    finally:
        os.close(fd)  # drops the lock


@atexit.register
def _release_all() -> None:
    """A process that ends without releasing (an error after start) still leaves the lock file empty."""
    for path in list(_held):
        _held[path][1] = 1
        release(path.parent)


def acquire_for_world(run_dir: Path) -> None:
    """:func:`acquire` on global rank 0; every rank raises the same error when it fails (one tiny broadcast
    of the verdict, so that no rank waits for rank 0 at a later collective). torch.distributed must be up
    when the world has more than one rank."""
    import torch.distributed as dist

    multi = dist.is_initialized() and dist.get_world_size() > 1
    verdict: list[tuple[bool, str] | None] = [None]  # (busy, message) of rank 0's failure
    error: BaseException | None = None
    if not multi or dist.get_rank() == 0:
        try:
            acquire(run_dir)
        except BaseException as e:  # any failure: the other ranks must hear of it, not wait
            error, verdict[0] = e, (isinstance(e, RunDirBusy), str(e))
    if multi:
        dist.broadcast_object_list(verdict, src=0)
    if error is not None:
        raise error
    if verdict[0] is not None:
        busy, message = verdict[0]
        raise RunDirBusy(message) if busy else UsageError(f"rank 0 could not lock the run dir: {message}")


class RunLock:
    """A trainer's hold on its run dir: :meth:`acquire` (all ranks, see :func:`acquire_for_world`) and
    :meth:`release`, each a no-op when already done, so that every ``fit()`` can hold it for its run."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.held = False

    def acquire(self) -> RunLock:
        if not self.held:
            acquire_for_world(self.run_dir)
            self.held = True
        return self

    def release(self) -> None:
        if self.held:
            release(self.run_dir)
            self.held = False

    def __del__(self) -> None:  # a trainer dropped without fit() (e.g. its set-up failed) lets go too
        try:
            self.release()
        except Exception:  # noqa: BLE001 (interpreter shutdown: the kernel drops the lock anyway)
            pass
