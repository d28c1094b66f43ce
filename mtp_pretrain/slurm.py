"""SLURM submission: the resolved Hydra config -> one sbatch script -> ``sbatch``.

The job runs ``srun torchrun --nnodes=$SLURM_NNODES --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:PORT``
(one torchrun per node: ``python -m mtp_pretrain.torchrun``, which reports a failed rank's status; MASTER_ADDR
= the first host of the allocation) with ``python -m mtp_pretrain.cli`` and the same overrides, into one run
directory; ``trainer.resume=auto`` makes every (re)start continue from the newest valid checkpoint, and the
wandb run id is kept in the run directory.

Rendezvous port: ``slurm.port`` if set, else one per job, ``20000 + SLURM_JOB_ID % 10000``: two jobs whose
first node is the same would otherwise both bind the same port (EADDRINUSE, one job fails). The range is
below Linux's ephemeral ports (32768-60999), which outgoing connections take; the same on every node with
nothing to exchange. Jobs whose ids differ by a multiple of 10000 share a port: they would have to run at
the same time with the same first node to collide.

Preemption: SLURM sends SIGUSR1 to the batch shell ``signal_seconds`` before the time limit
(``--signal=B:USR1@N``). torchrun does not forward SIGUSR1 to its workers, so the script's trap writes the
trainer's stop file (``<run_dir>/STOP``, see mtp_pretrain/preemption.py), stamped with the job id and restart
count: every rank saves at the next step boundary, removes the stop file and exits 75; seeing the file gone,
the script ``scontrol requeue``s the job (at most ``max_requeues`` times). A stop file the run did not consume
(the signal came after the last step) is the script's to remove; one it could not (killed) carries a stamp
that no other job honours.

The request is Hydra config too: mtp-submit composes conf/submit.yaml (the ``slurm`` group: conf/slurm/*.yaml
over :class:`SlurmConfig`) from the ``slurm=PRESET`` / ``slurm.KEY=VALUE`` overrides, and conf/train.yaml
from all the others, which the job receives verbatim.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from mtp_pretrain.errors import MTPError

REPO = Path(__file__).resolve().parent.parent
PORT_BASE, PORT_SPAN = 20000, 10000  # per-job rendezvous ports: below the ephemeral range 32768-60999
LOCAL_ADDR = ' --local-addr=$(hostname -I | cut -d" " -f1)'


@dataclass
class SlurmConfig:
    nodes: int = 1
    procs_per_node: int = 1  # training processes per node (= GPUs per node on GPU clusters)
    gpus_per_node: int = 0  # --gpus-per-node; 0 on CPU clusters
    cpus_per_task: int = 2  # one task (torchrun) per node: CPUs for all its processes
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"
    job_name: str = "mtp-pretrain"
    port: int | None = None  # rendezvous port on the first node; None: 20000 + job id % 10000 (per job)
    signal_seconds: int = 120  # USR1 this long before the time limit: save and requeue
    max_requeues: int = 3
    # run before training (modules, venv, NCCL env, ...); on the command line, quote shell text for Hydra:
    # "slurm.setup='source .venv/bin/activate; export NCCL_IB_DISABLE=0'"
    setup: str = "source .venv/bin/activate"
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH" lines, e.g. ["--exclusive"]
    # torchrun advertises its host name to the other nodes; where that name does not resolve to a reachable
    # address (containers, network namespaces), advertise the node's first IP instead (--local-addr)
    local_addr_from_ip: bool = False


@dataclass
class SubmitConfig:
    """The root of conf/submit.yaml: what mtp-submit asks SLURM for (the job's training config is apart)."""

    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``(request, training)`` overrides as Hydra parses them: those on the ``slurm`` group or its keys
    (``slurm=PRESET``, ``slurm.nodes=2``, ``+slurm.x=...``) compose the request; the others are the job's
    training overrides, unchanged and in order. ``hydra.*`` ones (e.g. a searchpath) go to both."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        hint = "quote a value holding shell text, e.g. \"slurm.setup='module load x; source y'\""
        raise SubmitError(f"{' '.join(str(e).split())} ({hint})") from e
    request, training = [], []
    for override, line in zip(parsed, overrides, strict=True):
        root = override.key_or_group.split(".")[0]
        if root in ("slurm", "hydra"):
            request.append(line)
        if root != "slurm":
            training.append(line)
    return request, training


class SubmitError(MTPError, RuntimeError):
    """The job cannot be submitted (no sbatch, bad request); the message says what to do."""


def sbatch_script(s: SlurmConfig, run_dir: Path, overrides: list[str], stop_file: str = "STOP") -> str:
    """The batch script for these Hydra ``overrides`` (run_dir is absolute; logs go to run_dir/slurm/)."""
    if s.nodes < 1 or s.procs_per_node < 1:
        raise SubmitError(f"slurm.nodes={s.nodes} and slurm.procs_per_node={s.procs_per_node} must be >= 1")
    if s.port is not None and not 0 < s.port < 65536:
        raise SubmitError(f"slurm.port={s.port} is not a TCP port (1-65535); leave it unset for one per job")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={s.job_name}",
        f"#SBATCH --nodes={s.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={s.cpus_per_task}",
        f"#SBATCH --time={s.time}",
        f"#SBATCH --output={run_dir}/slurm/%x-%j.out",
        "#SBATCH --open-mode=append",
        f"#SBATCH --signal=B:USR1@{s.signal_seconds}",
        "#SBATCH --requeue",
    ]
    for key in ("partition", "account", "qos"):
        if getattr(s, key):
            lines.append(f"#SBATCH --{key}={getattr(s, key)}")
    if s.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    lines += [f"#SBATCH {x}" for x in s.extra_sbatch]
    args = " ".join(shlex.quote(o) for o in [*overrides, f"trainer.run_dir={run_dir}", "trainer.resume=auto"])
    stop = shlex.quote(str(run_dir / stop_file)) if stop_file else "/dev/null"
    # written whole (a rename): a rank never reads half a stamp
    write_stop = f'; printf "%s\\n" "$STAMP" > {stop}.$SLURM_JOB_ID && mv -f {stop}.$SLURM_JOB_ID {stop}'
    write_stop = write_stop if stop_file else ""  # trainer.stop_file="": no file reaches the workers
    port = str(s.port) if s.port is not None else f"$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))"
    lines += [
        "",
        "set -u",
        f"cd {shlex.quote(str(REPO))}",
        s.setup,
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"RDZV_PORT={port}",
        "RESTARTS=${SLURM_RESTART_COUNT:-0}",
        'echo "job $SLURM_JOB_ID on $SLURM_NNODES node(s), restart $RESTARTS, rendezvous $MASTER_ADDR:$RDZV_PORT"',
        # the stop request's owner (preemption.py): no other job or attempt takes this file for its own
        'STAMP=$(printf \'{"slurm_job_id": "%s", "restart_count": %s}\' "$SLURM_JOB_ID" "$RESTARTS")',
        "PREEMPTED=0",
        "preempted() {  # SLURM's warning before the time limit: save at the next step, then requeue",
        f"  PREEMPTED=1{write_stop}",
        "}",
        "trap preempted USR1",
        "export MASTER_ADDR RDZV_PORT",
        # one torchrun per node; bash -c so that per-node values expand on that node
        "srun --kill-on-bad-exit=1 bash -c "
        + shlex.quote(
            f"exec python -m mtp_pretrain.torchrun --nnodes=$SLURM_NNODES --nproc-per-node={s.procs_per_node} "
            "--rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$RDZV_PORT --rdzv-id=$SLURM_JOB_ID "
            # the first node hosts the rendezvous store: said outright, not guessed from host names
            '--rdzv-conf=is_host=$([ "$SLURM_NODEID" = 0 ] && echo true || echo false)'
            + (LOCAL_ADDR if s.local_addr_from_ip else "")
            + f" -m mtp_pretrain.cli {args}"
        )
        + " &",
        "PID=$!",
        'while true; do wait "$PID"; RC=$?; kill -0 "$PID" 2>/dev/null || break; done  # a trap interrupts wait',
        # the trainer removes the stop file once its checkpoint is written (torchrun reports the workers'
        # exit status 75 as a plain failure, so that file is the signal that the stop was clean)
        f'if [ "$PREEMPTED" = 1 ] && [ ! -e {stop} ] && [ "$RESTARTS" -lt {s.max_requeues} ]; then',
        '  echo "saved after a stop request: requeueing"; scontrol requeue "$SLURM_JOB_ID"; exit 0',
        "fi",
        # a request the run did not consume (it came after the last step): gone with its job
        f'if [ "$PREEMPTED" = 1 ] && [ "$(cat {stop} 2>/dev/null)" = "$STAMP" ]; then',
        f'  rm -f {stop}; echo "stop request not consumed (it came after the last step): removed"',
        "fi",
        'exit "$RC"',
        "",
    ]
    return "\n".join(lines)


def submit(script: str, run_dir: Path, dry_run: bool = False) -> str:
    """Write ``run_dir/slurm/job.sbatch`` and submit it; returns sbatch's answer (or the path if dry_run)."""
    path = run_dir / "slurm" / "job.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if dry_run:
        return str(path)
    if shutil.which("sbatch") is None:
        raise SubmitError(
            "sbatch not found: run mtp-submit on a SLURM login node (or --dry-run to only write the script)"
        )
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()
