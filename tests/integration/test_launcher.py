"""Processes a launch leaves: SIGKILL to launch/torchrun.sh's process group leaves no rank and no data worker
running (a rank dies with its launcher: processes.exit_with_launcher, called first in cli.train), so a
killed job cannot go on writing into a run dir that a restarted job uses."""

import os
import signal
import time

from mtp_pretrain.processes import is_running
from tests.conftest import tiny_run_overrides
from tests.launch import ROOT, start


def _children(pid: int) -> list[int]:
    kids = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for task in tasks:
        try:
            kids += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return kids


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def test_killing_the_launcher_group_leaves_no_rank_running(synthetic_source, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(
        synthetic_source, tmp_path / "cache", run_dir, **{"trainer.steps": 10_000, "data.num_workers": 1}
    )
    launcher = start(["bash", str(ROOT / "launch" / "torchrun.sh"), "1", *overrides], start_new_session=True)
    tree: list[int] = []
    try:
        end = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists():  # training runs: ranks and their workers are up
            assert launcher.poll() is None and time.time() < end, launcher.communicate()
            time.sleep(0.2)
        tree = _tree(launcher.pid)
        assert len(tree) >= 3, tree  # torchrun, the rank, its DataLoader worker
        os.killpg(launcher.pid, signal.SIGKILL)  # torchrun put the rank in a session of its own
        launcher.wait(timeout=30)
        end = time.time() + 10
        while any(is_running(p) for p in tree) and time.time() < end:
            time.sleep(0.1)
        assert not [p for p in tree if is_running(p)], "a rank or worker outlived its launcher"
    finally:
        for p in set(tree) | set(_tree(launcher.pid)):
            if is_running(p):
                os.kill(p, signal.SIGKILL)
