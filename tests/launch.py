"""The one way tests start other processes: the CLI, tools, torchrun and shell scripts, each from the repo
root in a clean environment.

The pytest process holds a private torch.distributed world of one (tests/conftest.py), whose RANK /
MASTER_PORT ... variables would make a child join that world instead of starting its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mtp_pretrain.processes import child_env

ROOT = Path(__file__).resolve().parents[1]
INTEGRATION = ROOT / "tests" / "integration"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the torch.distributed variables (processes.child_env), plus
    ``extra``; the repo on PYTHONPATH."""
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def run(
    cmd: Sequence[str], timeout: float = 180, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    """``cmd`` from the repo root, output captured as text."""
    return subprocess.run(
        list(cmd), cwd=ROOT, env=env or clean_env(), capture_output=True, text=True, timeout=timeout, **kw
    )


def start(cmd: Sequence[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """``cmd`` started from the repo root (stdout/stderr piped, text), for tests that signal or kill it."""
    return subprocess.Popen(
        list(cmd),
        cwd=ROOT,
        env=env or clean_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def cli(*args: str) -> list[str]:
    """The command line of ``mtp-train`` with these overrides, as `make train` runs it."""
    return [sys.executable, "-m", "mtp_pretrain.cli", *args]


def tool(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python tools/<script> args``: a benchmark or helper as a user runs it."""
    return run([sys.executable, f"tools/{script}", *args], timeout=timeout)


def torchrun(nproc: int, script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=nproc script args`` (gloo on CPU; ~20 s per launch here)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
    ]
    return run([*cmd, *args], timeout=timeout)
