"""Benchmarks run as their own processes, the way a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_tool(script: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python tools/<script> args`` from the repo root, in a world of its own: without the
    torch.distributed env (MASTER_PORT ...) this pytest process may have set."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        [sys.executable, f"tools/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
