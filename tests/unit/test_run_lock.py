"""One writer per run dir (run_lock.py): a second job fails naming the holder; a dead holder's lock is
taken over; the lock neither outlives its release in forked helpers nor blocks where locks are missing."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys

import pytest

from mtp_pretrain import run_lock
from mtp_pretrain.errors import UsageError
from tests.launch import run, start

TRY = (
    "import sys; from mtp_pretrain.run_lock import RunDirBusy, acquire\n"
    "try: acquire(sys.argv[1]); print('took it')\n"
    "except RunDirBusy as e: print(e)"
)
HOLD = (
    "import sys, time; from mtp_pretrain.run_lock import acquire; acquire(sys.argv[1]); "
    "print('held', flush=True); time.sleep(120)"
)


def _holder(run_dir) -> subprocess.Popen:
    """Another process (a job) holding ``run_dir``'s lock."""
    proc = start([sys.executable, "-c", HOLD, str(run_dir)], env={**os.environ, "SLURM_JOB_ID": "4242"})
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def test_a_second_job_fails_naming_the_holder_and_takes_over_once_it_is_killed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        with pytest.raises(run_lock.RunDirBusy) as busy:
            run_lock.acquire(run_dir)
        message = str(busy.value)
        assert "\n" not in message and isinstance(busy.value, UsageError)  # exit status 2, one line
        assert f"run dir {run_dir} is in use by another job" in message
        assert f"host {socket.gethostname()}, pid {holder.pid}, Slurm job 4242, since " in message
        assert "trainer.run_dir" in message  # the fix
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up: the kernel drops its lock
        holder.communicate(timeout=30)
    capsys.readouterr()
    assert run_lock.acquire(run_dir) == run_dir.resolve() / ".lock"
    err = capsys.readouterr().err
    assert "taking over the lock of a job that is gone" in err and f"pid {holder.pid}, Slurm job 4242" in err
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()  # the new holder's name
    run_lock.release(run_dir)
    assert (run_dir / ".lock").read_text() == ""  # a clean end: the next job takes over silently
    assert run_lock.acquire(run_dir) and "taking over" not in capsys.readouterr().err
    run_lock.release(run_dir)


def _acquire_elsewhere(run_dir) -> str:
    """What another process trying ``run_dir``'s lock gets: "took it", or the error."""
    return run([sys.executable, "-c", TRY, str(run_dir)], env=dict(os.environ), timeout=60).stdout


def _sleep() -> None:
    import time

    time.sleep(60)


def test_holds_are_counted_in_a_process_and_forked_helpers_do_not_keep_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    run_lock.acquire(run_dir)
    run_lock.acquire(run_dir)  # a second trainer on the same run dir in this process: the same writer
    # a DataLoader worker / Manager forked now shares the lock file's descriptor (a flock would stay held)
    helper = multiprocessing.get_context("fork").Process(target=_sleep, daemon=True)
    helper.start()
    try:
        run_lock.release(run_dir)
        assert f"pid {os.getpid()}" in _acquire_elsewhere(run_dir)  # still held: one hold is left
        run_lock.release(run_dir)
        assert _acquire_elsewhere(run_dir) == "took it\n"  # free, although the forked helper still runs
    finally:
        helper.kill()
        helper.join()


def test_a_filesystem_without_locks_warns_once_and_goes_on(tmp_path, capsys, monkeypatch):
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "lockf", no_locks)
    monkeypatch.setattr(run_lock, "_warned", False)
    assert run_lock.acquire(tmp_path / "a") is None and run_lock.acquire(tmp_path / "b") is None
    err = capsys.readouterr().err
    assert err.count("does not support file locks") == 1 and str(tmp_path / "a") in err


def test_every_rank_raises_rank_0s_verdict(dist_world, tmp_path):
    """acquire_for_world (a world of one here; the broadcast is exercised by the Slurm cluster test)."""
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        lock = run_lock.RunLock(run_dir)
        with pytest.raises(run_lock.RunDirBusy, match=f"pid {holder.pid}"):
            lock.acquire()
        assert not lock.held
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    lock.acquire()
    lock.acquire()  # idempotent: one hold
    lock.release()
    assert run_lock.acquire(run_dir)  # released for good
    run_lock.release(run_dir)
