"""mtp-submit writes a valid sbatch script (the real-cluster tests are issue 7's); its stop-file and
rendezvous-port logic runs here in bash against stand-ins for srun and scontrol."""

import json
import signal
import time

import pytest

from mtp_pretrain.cli import submit
from mtp_pretrain.slurm import SlurmConfig, SubmitError, sbatch_script
from tests.launch import clean_env, run, start


def test_script_runs_torchrun_per_node_and_requeues_after_a_stop(tmp_path):
    s = SlurmConfig(
        nodes=2,
        procs_per_node=4,
        gpus_per_node=4,
        partition="gpu",
        signal_seconds=300,
        max_requeues=2,
        extra_sbatch=["--exclusive"],
    )
    script = sbatch_script(s, tmp_path / "run", ["mtp=n4", "model=small"])
    assert run(["bash", "-n"], input=script).returncode == 0  # valid bash
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
        f"#SBATCH --output={tmp_path}/run/slurm/%x-%j.out",
        "trap preempted USR1",
        f"> {tmp_path}/run/STOP.$SLURM_JOB_ID && mv -f {tmp_path}/run/STOP.$SLURM_JOB_ID {tmp_path}/run/STOP",
        '"$RESTARTS" -lt 2',
        f"[ ! -e {tmp_path}/run/STOP ]",
        "RDZV_PORT=$(( 20000 + SLURM_JOB_ID % 10000 ))",  # a port per job by default
    ]:
        assert line in script, line
    assert (
        "--nnodes=$SLURM_NNODES --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$RDZV_PORT"
        in script
    )
    assert "srun --kill-on-bad-exit=1 bash -c 'exec python -m mtp_pretrain.torchrun" in script
    assert "RDZV_PORT=29555\n" in sbatch_script(SlurmConfig(port=29555), tmp_path, [])  # slurm.port wins
    assert f"mtp=n4 model=small trainer.run_dir={tmp_path}/run trainer.resume=auto" in script
    assert "#SBATCH --account" not in script and "#SBATCH --qos" not in script
    with pytest.raises(SubmitError, match="slurm.nodes=0"):
        sbatch_script(SlurmConfig(nodes=0), tmp_path, [])
    with pytest.raises(SubmitError, match="slurm.port=70000 is not a TCP port"):
        sbatch_script(SlurmConfig(port=70000), tmp_path, [])


def test_cli_dry_run_checks_the_training_config_first(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    submit(["--dry-run", "slurm.nodes=2", "mtp=n2", f"trainer.run_dir={run}"])
    assert capsys.readouterr().out.strip() == str(run / "slurm" / "job.sbatch")
    assert "#SBATCH --nodes=2" in (run / "slurm" / "job.sbatch").read_text()
    with pytest.raises(SystemExit) as exit_:
        submit(["--dry-run", "mtp.n=0", f"trainer.run_dir={run}"])
    assert exit_.value.code == 2 and "mtp.n" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(SystemExit):
        submit([f"trainer.run_dir={run}"])
    assert "sbatch not found" in capsys.readouterr().err


def _error(capsys, *argv: str) -> str:
    """mtp-submit's one error line for ``argv`` (it must exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        submit(["--dry-run", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("mtp-submit: error: "), err
    return err


def test_slurm_keys_are_hydra_config_and_typos_are_one_line_errors(tmp_path, capsys):
    run = f"trainer.run_dir={tmp_path / 'run'}"
    assert "slurm.nodez" in _error(capsys, "slurm.nodez=2", run)
    assert "'foo' not in 'SlurmConfig'" in _error(capsys, "+slurm.foo=1", run)  # appending makes no key
    assert "converted to Integer" in _error(capsys, "slurm.nodes=two", run)
    assert "slurm/nope" in _error(capsys, "slurm=nope", run)
    assert "quote" in _error(capsys, "slurm.setup=source x; export A=1", run)  # shell text: Hydra quoting


def test_the_job_gets_exactly_the_training_overrides(tmp_path, capsys):
    """Request overrides (any Hydra form) compose conf/submit.yaml; the others reach the job as given."""
    run = tmp_path / "run"
    training = ["+experiment=cpu_demo", "mtp=n2", "trainer.steps=7", f"trainer.run_dir={run}"]
    request = [
        "slurm.nodes=2",
        "slurm=default",
        "slurm.setup='source x; export A=1'",
        "+slurm.extra_sbatch=[-a]",
    ]
    submit(["--dry-run", request[0], training[0], request[1], *training[1:3], *request[2:], training[3]])
    script = (run / "slurm" / "job.sbatch").read_text()
    assert f"-m mtp_pretrain.cli {' '.join(training)} trainer.run_dir={run} trainer.resume=auto'" in script
    assert "#SBATCH --nodes=2" in script and "#SBATCH -a" in script
    assert "\nsource x; export A=1\n" in script


def test_a_cluster_preset_is_picked_by_name(tmp_path):
    """`mtp-submit slurm=<cluster>`: conf/slurm/<cluster>.yaml, here from a search path as a user's own."""
    (tmp_path / "conf" / "slurm").mkdir(parents=True)
    (tmp_path / "conf" / "slurm" / "my_cluster.yaml").write_text(
        "defaults:\n  - base_slurm\npartition: gpu\ngpus_per_node: 8\nprocs_per_node: 8\n"
    )
    run = tmp_path / "run"
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"  # the job gets it too: harmless there
    submit(["--dry-run", "slurm=my_cluster", search, f"trainer.run_dir={run}"])
    script = (run / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --partition=gpu" in script and "--nproc-per-node=8" in script


# stand-ins: srun runs the job's part in its environment (FAKE_SRUN: what the training does), scontrol
# names the first node and records a requeue
FAKE_SRUN = """#!/bin/bash
echo "$RDZV_PORT" > "$LOG/port"; touch "$LOG/started"
STOP="$RUN/STOP"
case "$FAKE_SRUN" in
  late) while [ ! -e "$STOP" ]; do sleep 0.05; done; exit 0 ;;  # the stop came after the last step
  saves) while [ ! -e "$STOP" ]; do sleep 0.05; done; cp "$STOP" "$LOG/stamp"; rm "$STOP"; exit 75 ;;
  done) exit 0 ;;
esac
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in show) echo node1 ;; requeue) echo "$2" > "$LOG/requeued" ;; esac
"""


def _job(tmp_path, fake_srun: str, usr1: bool, restart: int = 0, port: int | None = None):
    """Run the batch script of a job (id 31337, this restart) whose training does ``fake_srun``;
    ``usr1``: Slurm's warning arrives once training runs. Returns (exit status, log dir, run dir)."""
    bin_, log, run_dir = tmp_path / "bin", tmp_path / "log", tmp_path / "run"
    for d in (bin_, log, run_dir):
        d.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(SlurmConfig(setup=":", port=port), run_dir, []))
    env = clean_env(
        PATH=f"{bin_}:/usr/bin:/bin",
        LOG=str(log),
        RUN=str(run_dir),
        FAKE_SRUN=fake_srun,
        SLURM_JOB_ID="31337",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="node1",
        **({"SLURM_RESTART_COUNT": str(restart)} if restart else {}),
    )
    proc = start(["bash", str(script)], env=env)
    end = time.time() + 30
    while not (log / "started").exists() and time.time() < end:
        time.sleep(0.05)
    if usr1:
        proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=30)
    return proc.returncode, log, run_dir


def test_a_stop_the_run_saved_for_requeues_and_is_stamped_with_its_job(tmp_path):
    rc, log, run_dir = _job(tmp_path, "saves", usr1=True, restart=1)
    assert rc == 0 and (log / "requeued").read_text() == "31337\n"
    assert json.loads((log / "stamp").read_text()) == {"slurm_job_id": "31337", "restart_count": 1}
    assert (log / "port").read_text() == "21337\n"  # 20000 + 31337 % 10000


def test_a_stop_after_the_last_step_is_removed_with_its_job_and_not_requeued(tmp_path):
    rc, log, run_dir = _job(tmp_path, "late", usr1=True, port=29555)
    assert rc == 0 and not (log / "requeued").exists()
    assert not (run_dir / "STOP").exists()  # the next job in this run dir must not stop at its first step
    assert (log / "port").read_text() == "29555\n"
    foreign = '{"slurm_job_id": "1", "restart_count": 0}\n'
    (run_dir / "STOP").write_text(foreign)  # not this job's (nor one it received): left alone
    rc, log, run_dir = _job(tmp_path, "done", usr1=False)
    assert rc == 0 and (run_dir / "STOP").read_text() == foreign
