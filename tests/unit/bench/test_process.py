"""The benchmarks' process set-up: the mmap-threshold re-exec, the torchrun
re-launch and the world around a measurement (all without starting a process)."""

import sys

import pytest

from mtp_pretrain import parallel
from mtp_pretrain.bench import process


def test_pin_mmap_threshold_reexecutes_the_command_line_once(monkeypatch):
    calls = []
    monkeypatch.setattr(process.os, "execv", lambda exe, argv: calls.append((exe, argv)))
    monkeypatch.setattr(sys, "orig_argv", ["python", "tools/bench_x.py", "--n", "4"])
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    process.pin_mmap_threshold()
    assert calls == [(sys.executable, [sys.executable, "tools/bench_x.py", "--n", "4"])]
    assert process.mmap_threshold_pinned()
    process.pin_mmap_threshold()  # the re-executed process: already pinned, goes on
    assert len(calls) == 1


def test_relaunch_runs_the_module_under_torchrun_and_exits_with_its_status(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    commands = []
    monkeypatch.setattr(process.subprocess, "call", lambda cmd: commands.append(cmd) or 3)
    with pytest.raises(SystemExit) as stop:
        process.relaunch_under_torchrun("mtp_pretrain.bench.step", 2, ["--pp", "2"])
    assert stop.value.code == 3
    (cmd,) = commands
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in cmd
    assert cmd[-4:] == ["-m", "mtp_pretrain.bench.step", "--pp", "2"]


def test_relaunch_under_torchrun_returns_in_its_children(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(process.subprocess, "call", lambda cmd: pytest.fail("relaunched again"))
    process.relaunch_under_torchrun("mtp_pretrain.bench.step", 2, [])


def test_distributed_world_is_torn_down_even_when_the_benchmark_fails(monkeypatch):
    events = []
    monkeypatch.setattr(
        parallel, "init_distributed", lambda tp, pp: events.append(("init", tp, pp)) or "layout"
    )
    monkeypatch.setattr(parallel, "destroy_distributed", lambda: events.append("destroy"))
    with pytest.raises(RuntimeError), process.distributed_world(tp=2, pp=1) as layout:
        assert layout == "layout"
        raise RuntimeError("the benchmark failed")
    assert events == [("init", 2, 1), "destroy"]
