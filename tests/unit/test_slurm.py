"""mtp-submit writes a valid sbatch script (the real-cluster tests are issue 7's)."""

import subprocess

import pytest

from mtp_pretrain.cli import submit
from mtp_pretrain.slurm import SlurmConfig, SubmitError, sbatch_script


def test_script_runs_torchrun_per_node_and_requeues_after_a_stop(tmp_path):
    s = SlurmConfig(nodes=2, procs_per_node=4, gpus_per_node=4, partition="gpu", signal_seconds=300, max_requeues=2,
                    extra_sbatch=["--exclusive"])  # fmt: skip
    script = sbatch_script(s, tmp_path / "run", ["mtp=n4", "model=small"])
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --exclusive",
                 f"#SBATCH --output={tmp_path}/run/slurm/%x-%j.out", "trap preempted USR1",
                 f"touch {tmp_path}/run/STOP", '"$RESTARTS" -lt 2', f"[ ! -e {tmp_path}/run/STOP ]"]:  # fmt: skip
        assert line in script, line
    assert "--nnodes=$SLURM_NNODES --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500" in script
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
