"""Kill -9 at arbitrary points (mid gradient accumulation, mid save, between save and marker), signals and a
stop file: the resumed run's losses, final parameters and random streams are bit-identical to an uninterrupted
run's. Every run trains with dropout, so each resume must also continue the dropout streams bit for bit."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron.core.dist_checkpointing.serialization import load_plain_tensors

from mtp_pretrain.metrics import load_history
from mtp_pretrain.preemption import EXIT_PREEMPTED
from tests.conftest import tiny_run_overrides
from tests.launch import cli, start

STEPS = 6


def _overrides(source: Path, cache: Path, run_dir: Path) -> list[str]:
    return tiny_run_overrides(
        source,
        cache,
        run_dir,
        **{
            "trainer.steps": STEPS,
            "trainer.save_every": 2,
            "trainer.grad_accum": 2,
            "trainer.keep_last": 5,
            "logging.plot": "false",
            "model.dropout": 0.1,  # hidden + attention dropout: torch's and megatron's tracker streams
        },
    )


def _cli(overrides: list[str], crash_at: str | None = None, **popen) -> subprocess.Popen:
    """mtp-train with these overrides; with ``crash_at`` (POINT:K) under tests/faults.py, which kills it there."""
    cmd = [sys.executable, "tests/faults.py", crash_at, *overrides] if crash_at else cli(*overrides)
    return start(cmd, **popen)


def _run(overrides: list[str], crash_at: str | None = None) -> tuple[int, str]:
    proc = _cli(overrides, crash_at)
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out + err


def _train_losses(run_dir: Path) -> list[tuple[int, float, float, float]]:
    """(step, loss, head1, head2) of every step in the final history (a resume's rewind resolved)."""
    rows = [r for r in load_history(run_dir / "metrics.jsonl") if r["split"] == "train"]
    return [(r["step"], r["loss"], r["loss/head1"], r["loss/head2"]) for r in rows]


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_source):
    root = tmp_path_factory.mktemp("faults")
    cache, run_dir = root / "cache", root / "reference"
    rc, log = _run(_overrides(synthetic_source, cache, run_dir))
    assert rc == 0, log[-3000:]
    return {"root": root, "cache": cache, "run_dir": run_dir, "losses": _train_losses(run_dir)}


def _assert_same_run(run_dir: Path, reference: dict) -> None:
    """Exact: each resume restores every state bit for bit and runs the same kernels on this machine (the
    same CPU, thread count and data order as the reference run), so the whole run is deterministic."""
    assert _train_losses(run_dir) == reference["losses"]  # bit-identical, every step and head
    final = f"step_{STEPS:08d}"
    want = load_plain_tensors(str(reference["run_dir"] / "checkpoints" / final))
    got = load_plain_tensors(str(run_dir / "checkpoints" / final))
    assert want.keys() == got.keys()
    tensors = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
    assert sum(k.startswith(("decoder.", "heads.")) for k in tensors) > 10
    assert sum(k.startswith("optimizer.state.exp_avg.") for k in tensors) > 10
    worst = max((got[k].double() - want[k].double()).abs().max().item() for k in tensors)
    assert worst == 0.0, worst  # parameters and optimizer moments
    want_rng, got_rng = (
        torch.load(r / "checkpoints" / final / "rank_00000.pt", weights_only=True)["rng"]
        for r in (reference["run_dir"], run_dir)
    )
    assert torch.equal(got_rng["torch"], want_rng["torch"])  # no stream was drawn from after a restore
    assert all(torch.equal(got_rng["tracker"][k], want_rng["tracker"][k]) for k in want_rng["tracker"])
    assert got_rng["python"] == want_rng["python"]  # seeded from trainer.seed, not from OS entropy
    assert all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        for a, b in zip(got_rng["numpy"], want_rng["numpy"], strict=True)
    )


def test_kill_at_every_kind_of_point_then_resume_is_bit_identical(dist_world, reference, synthetic_source):
    """One run directory killed four times at different points, resumed each time, then finished."""
    run_dir = reference["root"] / "killed"
    overrides = _overrides(synthetic_source, reference["cache"], run_dir)
    ckpts = run_dir / "checkpoints"

    rc, log = _run(overrides, crash_at="micro_batch:8")  # step 4, between its two micro-batches
    assert rc == -signal.SIGKILL, log[-2000:]
    assert _latest(run_dir) == "step_00000002"

    rc, log = _run(overrides, crash_at="save_written:1")  # resumed at 2; killed inside the step-4 save
    assert rc == -signal.SIGKILL, log[-2000:]
    assert "resumed from" in log and _latest(run_dir) == "step_00000002"
    assert (ckpts / ".tmp-step_00000004").is_dir() and not (ckpts / "step_00000004").exists()

    rc, log = _run(overrides, crash_at="save_renamed:1")  # step 4 renamed into place, marker not updated
    assert rc == -signal.SIGKILL, log[-2000:]
    assert (ckpts / "step_00000004").is_dir() and _latest(run_dir) == "step_00000002"
    assert not (ckpts / ".tmp-step_00000004").exists()  # the stale temporary directory was cleaned

    rc, log = _run(overrides, crash_at="step:1")  # resumed at 2 (the marker), killed right after step 3
    assert rc == -signal.SIGKILL, log[-2000:]

    rc, log = _run(overrides)  # and to the end
    assert rc == 0, log[-3000:]
    _assert_same_run(run_dir, reference)


def test_signal_and_stop_file_save_exit_75_and_resume_bit_identical(dist_world, reference, synthetic_source):
    run_dir = reference["root"] / "signalled"
    overrides = _overrides(synthetic_source, reference["cache"], run_dir)
    proc = _cli(overrides, bufsize=1)
    for line in proc.stdout:  # wait until training runs, then preempt
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)  # SIGUSR1 (to one rank of several): tests/distributed
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:] + err[-3000:]
    assert "stopping at step" in out and "SIGTERM" in out
    stopped_at = int(_latest(run_dir).split("_")[1])
    assert 2 <= stopped_at < STEPS

    run_dir.mkdir(exist_ok=True)
    (run_dir / "STOP").write_text("")  # what a batch script does for workers that never see its signal
    rc, log = _run(overrides)
    assert rc == EXIT_PREEMPTED, log[-3000:]
    assert _latest(run_dir) == f"step_{stopped_at + 1:08d}" and not (run_dir / "STOP").exists()

    rc, log = _run(overrides)
    assert rc == 0, log[-3000:]
    _assert_same_run(run_dir, reference)


def test_plain_tensor_load_sees_a_real_difference(dist_world, reference):
    """The comparison above can fail: two different steps' parameters differ."""
    a = load_plain_tensors(str(reference["run_dir"] / "checkpoints" / "step_00000004"))
    b = load_plain_tensors(str(reference["run_dir"] / "checkpoints" / "step_00000006"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
