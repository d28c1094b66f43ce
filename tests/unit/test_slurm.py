"""mtp-submit writes a valid sbatch script (the real-cluster tests are issue 7's)."""

import pytest

from mtp_pretrain.cli import submit
from mtp_pretrain.slurm import SlurmConfig, SubmitError, sbatch_script
from tests.launch import run


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
        f"touch {tmp_path}/run/STOP",
        '"$RESTARTS" -lt 2',
        f"[ ! -e {tmp_path}/run/STOP ]",
    ]:
        assert line in script, line
    assert (
        "--nnodes=$SLURM_NNODES --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500"
        in script
    )
    assert "srun --kill-on-bad-exit=1 bash -c 'exec python -m torch.distributed.run" in script
    assert f"mtp=n4 model=small trainer.run_dir={tmp_path}/run trainer.resume=auto" in script
    assert "#SBATCH --account" not in script and "#SBATCH --qos" not in script
    with pytest.raises(SubmitError, match="slurm.nodes=0"):
        sbatch_script(SlurmConfig(nodes=0), tmp_path, [])


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
