"""On a real two-node Slurm cluster started by launch/slurm_test_cluster.sh (root; torn down afterwards):
a 2-node x 2-process job submitted by mtp-submit trains like local torchrun, and a USR1 preemption mid-run
saves, requeues and finishes with the uninterrupted job's losses and parameters. Alongside (sharing the
cluster and its launches): two jobs with the same first node at the same time (a rendezvous port each), a
USR1 after the last step that must not stop the run dir's next job, and a job on a run dir that another
holds (every rank fails with the holder's name)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from megatron.core.dist_checkpointing.serialization import load_plain_tensors

from mtp_pretrain import run_lock
from mtp_pretrain.metrics import load_history
from tests.conftest import tiny_run_overrides
from tests.launch import ROOT, clean_env, run, torchrun

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the test cluster needs root (namespaces, daemons)")
STEPS = 8
STATE = Path("/tmp/mtp-slurm-tests")


def _env() -> dict[str, str]:
    return clean_env(SLURM_CONF=str(STATE / "slurm.conf"), MTP_SLURM_STATE=str(STATE))


@pytest.fixture(scope="module")
def cluster():
    script = ROOT / "launch" / "slurm_test_cluster.sh"
    start = time.perf_counter()
    up = run(["bash", str(script), "start"], env=_env(), timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    print(f"slurm test cluster up in {time.perf_counter() - start:.1f}s")
    yield
    run(["bash", str(script), "stop"], env=_env(), timeout=60)


def _overrides(source: Path, root: Path, name: str, **extra: object) -> list[str]:
    return tiny_run_overrides(
        source,
        root / "cache",
        root / name,
        **{"trainer.steps": STEPS, "trainer.save_every": 2, "logging.plot": "false", **extra},
    )


def _submit(overrides: list[str], nodes: int = 2, procs: int = 2, *slurm: str) -> str:
    cmd = [str(Path(sys.executable).parent / "mtp-submit")]
    request = [
        f"slurm.nodes={nodes}",
        f"slurm.procs_per_node={procs}",
        "slurm.cpus_per_task=2",
        "slurm.local_addr_from_ip=true",
        f"slurm.setup='source {ROOT}/.venv/bin/activate; export GLOO_SOCKET_IFNAME=eth0'",
        *slurm,
    ]
    out = run([*cmd, *request, *overrides], env=_env(), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1]


def _job(job: str) -> dict[str, str]:
    text = run(["scontrol", "show", "job", "-o", job], env=_env()).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _wait(job: str, timeout: float = 400) -> dict[str, str]:
    end = time.time() + timeout
    while time.time() < end:
        info = _job(job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return info
        time.sleep(2)
    raise AssertionError(f"job {job} did not finish: {_job(job)}")


def _log(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.out")))


def _losses(run_dir: Path) -> list[tuple]:
    rows = [r for r in load_history(run_dir / "metrics.jsonl") if r["split"] == "train"]
    return [(r["step"], r["loss"], r["loss/head1"], r["loss/head2"]) for r in rows]


def _steps(run_dir: Path) -> list[int]:
    history = run_dir / "metrics.jsonl"
    if not history.is_file():
        return []
    return [r["step"] for r in map(json.loads, history.read_text().splitlines()) if r["split"] == "train"]


def _wait_for_step(run_dir: Path, step: int, timeout: float = 300) -> None:
    end = time.time() + timeout
    while step not in _steps(run_dir):
        assert time.time() < end, f"{run_dir} did not reach step {step}: {_log(run_dir)[-3000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(cluster, synthetic_source, tmp_path_factory):
    """The 2-node job, and at the same time a 1-process job on its first node ("late") that Slurm's USR1
    reaches after its last step (during the final validation, widened by more validation batches)."""
    root = tmp_path_factory.mktemp("slurm")
    start = time.perf_counter()
    job = _submit(_overrides(synthetic_source, root, "job"))
    late_overrides = _overrides(synthetic_source, root, "late", **{"trainer.val_batches": 40})
    late = _submit(late_overrides, 1, 1, "slurm.extra_sbatch=['--nodelist=node1']")
    _wait_for_step(root / "late", STEPS)
    run(["scancel", "--signal=USR1", "--batch", late], env=_env(), check=True)
    info, late_info = _wait(job), _wait(late)
    elapsed = time.perf_counter() - start
    assert info["JobState"] == "COMPLETED", _log(root / "job")[-4000:]
    assert late_info["JobState"] == "COMPLETED", _log(root / "late")[-4000:]
    print(f"2-node x 2-process job beside a 1-process one: {elapsed:.0f}s from sbatch to COMPLETED")
    return root, {"job": info, "late": late_info}, late_overrides


def test_two_node_job_matches_local_torchrun(uninterrupted, synthetic_source):
    root = uninterrupted[0]
    local = root / "local"
    script = ROOT / "mtp_pretrain" / "cli.py"
    proc = torchrun(4, script, *_overrides(synthetic_source, root, "local"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    job, ref = _losses(root / "job"), _losses(local)
    assert [r[0] for r in job] == list(range(1, STEPS + 1)) and len(ref) == STEPS
    worst = max(abs(a - b) for x, y in zip(job, ref, strict=True) for a, b in zip(x[1:], y[1:], strict=True))
    print(f"slurm job vs local torchrun: worst per-head loss difference {worst:.1e}")
    # the same 4-rank layout, ranks and data on the same CPU (the nodes are namespaces of this machine;
    # torchrun sets one thread per rank in both): the same sums in the same order. 1e-6 is 2 ulps of a head
    # loss (~5.7) and 1 of the total (~11.4): equal to the last bit or two
    assert worst < 1e-6


def test_jobs_sharing_their_first_node_rendezvous_on_ports_of_their_own(uninterrupted):
    """Both jobs hosted their rendezvous on node1 at the same time (a fixed port: EADDRINUSE, one fails)."""
    root, info, _ = uninterrupted
    job, late = info["job"], info["late"]
    assert job["NodeList"] == "node[1-2]" and late["NodeList"] == "node1"
    assert (
        job["StartTime"] <= late["EndTime"] and late["StartTime"] <= job["EndTime"]
    )  # ISO times: ran together
    ports = {}
    for name in ("job", "late"):
        found = re.findall(r"rendezvous node1:(\d+)", _log(root / name))
        jobid = info[name]["JobId"]
        assert found == [str(20000 + int(jobid) % 10000)], _log(root / name)[-2000:]
        ports[name] = found[0]
    assert ports["job"] != ports["late"]


@pytest.fixture(scope="module")
def second_wave(uninterrupted, synthetic_source):
    """At once: the "late" run dir's next job (two more steps; a stop file its predecessor could have left,
    had its batch script been killed, waits there), and a 2-node job on a run dir this process holds."""
    root, info, late_overrides = uninterrupted
    late_log = _log(root / "late")
    stale = {"slurm_job_id": info["late"]["JobId"], "restart_count": 0}
    (root / "late" / "STOP").write_text(json.dumps(stale) + "\n")
    locked = root / "locked"
    run_lock.acquire(locked)
    try:
        nxt = _submit([*late_overrides, f"trainer.steps={STEPS + 2}"], 1, 1)
        busy = _submit(_overrides(synthetic_source, root, "locked"))
        busy_info, next_info = _wait(busy), _wait(nxt)
    finally:
        run_lock.release(locked)
    return root, late_log, next_info, busy_info


def test_a_usr1_after_the_last_step_does_not_stop_the_next_job(second_wave):
    root, late_log, info, _ = second_wave
    run_dir = root / "late"
    # the first job: USR1 arrived, nothing was left to save; the script removed its own request
    assert "stop request not consumed (it came after the last step): removed" in late_log, late_log[-3000:]
    assert "requeueing" not in late_log and "stopping at step" not in late_log
    log = _log(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log[-4000:]
    assert f"removed stale stop file {run_dir / 'STOP'}" in log  # one a killed script would have left
    assert _steps(run_dir) == list(range(1, STEPS + 3)) and not (run_dir / "STOP").exists()


def test_a_job_on_a_run_dir_in_use_fails_on_every_rank_naming_the_holder(second_wave):
    root, _, _, info = second_wave
    log = _log(root / "locked")
    # (the job's exit code is srun's: the highest of its tasks', here 143 of the task it then terminated)
    assert info["JobState"] == "FAILED", log[-4000:]
    holder = (
        f"run dir {root / 'locked'} is in use by another job (host {os.uname().nodename}, pid {os.getpid()}"
    )
    assert log.count(f"mtp-train: error: {holder}") == 4, log[-4000:]  # each rank: no rank waits
    # each node's launcher reports the first of its ranks to fail, unless srun stopped it first
    assert re.search(r"torchrun: error: rank \d exited with status 2 \(see its error line above\)", log)
    assert "Traceback" not in log
    assert not (root / "locked" / "metrics.jsonl").exists()  # nothing written


def test_usr1_preemption_saves_requeues_and_finishes_identically(dist_world, uninterrupted, synthetic_source):
    root = uninterrupted[0]
    run_dir = root / "preempted"
    job = _submit(_overrides(synthetic_source, root, "preempted"))
    _wait_for_step(run_dir, 2)  # preempt once training is under way
    run(["scancel", "--signal=USR1", "--batch", job], env=_env(), check=True)
    info = _wait(job)
    log = _log(run_dir)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["Restarts"] == "1" and "requeueing" in log and "resumed from" in log
    # no step lost past the checkpoint, bit-identical: the same job resumed on this machine (see test_faults)
    assert _losses(run_dir) == _losses(root / "job")
    final = f"checkpoints/step_{STEPS:08d}"
    want, got = load_plain_tensors(str(root / "job" / final)), load_plain_tensors(str(run_dir / final))
    assert all(torch.equal(got[k], v) for k, v in want.items() if isinstance(v, torch.Tensor))


def test_more_nodes_than_the_cluster_has_is_a_clear_error(cluster, tmp_path):
    cmd = [
        str(Path(sys.executable).parent / "mtp-submit"),
        "slurm.nodes=5",
        f"trainer.run_dir={tmp_path / 'run'}",
    ]
    out = run(cmd, env=_env(), timeout=60)
    assert out.returncode == 2 and "mtp-submit: error: sbatch refused the job" in out.stderr, out.stderr
