"""A stop request belongs to the job that received it (preemption.StopRequest and the stop file's stamp)."""

from __future__ import annotations

import json
import signal

import pytest

from mtp_pretrain.preemption import StopRequest


def _stamp(job: str, restart: int) -> str:
    """What the sbatch script's USR1 trap writes (slurm.py), newline included."""
    return json.dumps({"slurm_job_id": job, "restart_count": restart}) + "\n"


@pytest.fixture
def job_7_restart_1(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")


def _asked(stop_file, clear_stale: bool = False) -> tuple[bool, StopRequest]:
    stop = StopRequest(stop_file, clear_stale=clear_stale)
    try:
        return stop.requested(), stop
    finally:
        stop.close()


def test_this_jobs_stamp_and_an_unstamped_file_are_honoured(tmp_path, job_7_restart_1):
    stop_file = tmp_path / "STOP"
    stop_file.write_text(_stamp("7", 1))  # the trap of this very attempt (e.g. during start-up)
    asked, stop = _asked(stop_file, clear_stale=True)
    assert asked and stop.reason == f"stop file {stop_file}" and stop_file.exists()
    for text in ("", "please stop\n", "[1, 2]"):  # `touch STOP`, a user's own scripts: nobody's stamp
        stop_file.write_text(text)
        assert _asked(stop_file, clear_stale=True)[0] and stop_file.exists()


def test_another_jobs_or_attempts_stamp_is_stale_removed_at_start_and_logged(
    tmp_path, job_7_restart_1, capsys
):
    stop_file = tmp_path / "STOP"
    for job, restart in (("6", 1), ("7", 0)):  # an earlier job; this job's previous attempt
        stop_file.write_text(_stamp(job, restart))
        asked, _ = _asked(stop_file)  # a rank that does not clear: ignores it, leaves it
        assert not asked and stop_file.exists()
        asked, _ = _asked(stop_file, clear_stale=True)  # rank 0 at the start of training
        assert not asked and not stop_file.exists()
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"removed stale stop file {stop_file}" in err
        assert (
            f"requested of Slurm job {job}, restart {restart}, not of this job (Slurm job 7, restart 1)"
            in err
        )


def test_outside_slurm_a_stamped_file_is_stale_and_a_signal_still_stops(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    stop_file = tmp_path / "STOP"
    stop_file.write_text(_stamp("7", 0))
    stop = StopRequest(stop_file, clear_stale=True)
    try:
        assert not stop_file.exists() and "not of this job (not a Slurm job)" in capsys.readouterr().err
        assert not stop.requested()
        stop_file.write_text("")  # touched during the run: honoured
        assert stop.requested()
        stop.acknowledge()
        assert not stop_file.exists()
    finally:
        stop.close()
    stop = StopRequest(None)
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert stop.requested() and stop.reason == "SIGUSR1"
    finally:
        stop.close()


def test_a_stale_file_does_not_stop_the_run_but_the_world_agrees_on_another_ranks_request(
    tmp_path, job_7_restart_1
):
    stop_file = tmp_path / "STOP"
    stop_file.write_text(_stamp("1", 0))  # not ours
    stop = StopRequest(stop_file)
    try:
        assert not stop.requested() and not stop.agreed(False)
        assert stop.agreed(True) and stop.reason == "another rank was asked to stop"
    finally:
        stop.close()
