#!/usr/bin/env bash
# One node, N processes: bash launch/torchrun.sh NPROC [hydra overrides...]
#   e.g. bash launch/torchrun.sh 2 parallel.tp=2            # CPU: gloo; GPU: nccl, one process per GPU
# Standalone rendezvous on a free local port; every rank runs `python -m mtp_pretrain.cli`. The launcher is
# torchrun as mtp_pretrain.torchrun: a failed rank's status (2 config, 4 data, 5 checkpoint, 75 stopped)
# is the script's, with one line instead of torchrun's traceback; ranks die with it (even by SIGKILL).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: launch/torchrun.sh NPROC [overrides...]}
shift
PY=${PYTHON:-.venv/bin/python}
# one intra-op thread per rank on CPU unless asked otherwise: N ranks share the machine's cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$PY" -m mtp_pretrain.torchrun --standalone --nproc-per-node="$NPROC" -m mtp_pretrain.cli "$@"
