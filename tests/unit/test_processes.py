"""Child processes start a torch.distributed world of their own; ranks die with their launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mtp_pretrain import processes
from mtp_pretrain.torchrun import failed_rank
from tests.launch import clean_env, run, start

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")

# a rank: arms the signal, says so, and would run for two minutes
RANK = (
    "import time; from mtp_pretrain.processes import exit_with_launcher\n"
    "print('armed' if exit_with_launcher() else 'not armed', flush=True); time.sleep(120)"
)
# a launcher: starts one rank (torchrun's variables, as mtp_pretrain.torchrun passes them), prints its pid
LAUNCHER = (
    "import os, subprocess, sys, time\n"
    "env = dict(os.environ, MTP_LAUNCHER_PID=str(os.getpid())) if sys.argv[1] == 'torchrun' else os.environ\n"
    "rank = subprocess.Popen([sys.executable, '-c', sys.argv[2]], env=env, start_new_session=True)\n"
    "print(rank.pid, flush=True); time.sleep(120)"
)


def test_child_env_drops_the_launcher_variables_and_adds_extra(monkeypatch):
    for var in processes.DIST_VARS:
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("KEEP_ME", "yes")
    env = processes.child_env(EXTRA="x")
    assert not set(processes.DIST_VARS) & set(env)
    assert env["KEEP_ME"] == "yes" and env["EXTRA"] == "x"


def _gone(pid: int, timeout: float = 10) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if not processes.is_running(pid):  # gone, or a zombie its new parent has not reaped
            return True
        time.sleep(0.05)
    return False


def _launch(kind: str) -> tuple[subprocess.Popen, int]:
    """A launcher of ``kind`` ("torchrun" or "plain") with one rank that said whether it armed the signal."""
    env = clean_env(TORCHELASTIC_RUN_ID="test", LOCAL_RANK="0") if kind == "torchrun" else clean_env()
    launcher = start([sys.executable, "-c", LAUNCHER, kind, RANK], env=env)
    rank = int(launcher.stdout.readline())
    assert launcher.stdout.readline().strip() == ("armed" if kind == "torchrun" else "not armed")
    return launcher, rank


def test_a_rank_dies_when_its_launcher_is_killed():
    launcher, rank = _launch("torchrun")  # in a session of its own, as torchrun starts ranks
    launcher.send_signal(signal.SIGKILL)
    launcher.communicate(timeout=30)
    assert _gone(rank), f"rank {rank} outlived its launcher"

    launcher, rank = _launch("plain")  # the control: not a torchrun rank, so nothing arms it
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=30)
    try:
        assert not _gone(rank, timeout=1)  # a rank that did not call it would live on
    finally:
        os.kill(rank, signal.SIGKILL)
        launcher.communicate(timeout=30)  # the rank held the launcher's output pipe


def test_a_rank_whose_launcher_died_before_it_armed_exits_at_once():
    dead = run([sys.executable, "-c", "import os; print(os.getpid())"]).stdout.strip()
    env = clean_env(TORCHELASTIC_RUN_ID="test", LOCAL_RANK="0", MTP_LAUNCHER_PID=dead)
    proc = run([sys.executable, "-c", RANK], env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL and f"its launcher (pid {dead}) is gone" in proc.stderr


def test_torchrun_passes_a_ranks_status_through_with_one_line(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys, time\n"
        "from mtp_pretrain.processes import exit_with_launcher\n"
        "assert exit_with_launcher()\n"
        "if os.environ['RANK'] == '1':\n"
        "    print('mtp-train: error: shard x.tar is not a tar file', file=sys.stderr)\n"
        "    sys.exit(4)\n"
        "time.sleep(60)\n"
    )
    cmd = [sys.executable, "-m", "mtp_pretrain.torchrun", "--standalone", "--nproc-per-node=3", str(script)]
    proc = run(cmd, timeout=120)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "torchrun: error: rank 1 exited with status 4 (see its error line above)" in proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_the_reported_rank_is_the_first_with_an_error_of_its_own():
    assert failed_rank({0: 1, 3: 4}, {0: 1.0, 3: 2.0}) == 3  # 1: mostly a rank whose peer died first
    assert failed_rank({0: -9, 1: 75}, {0: 1.0, 1: 1.0}) == 1
    assert failed_rank({2: 5, 1: 4}, {2: 1.0, 1: 2.0}) == 2  # the first to fail
    assert failed_rank({0: 1, 1: -15}, {0: 2.0, 1: 1.0}) == 1  # only consequences: the first
