#!/usr/bin/env bash
# One node, N processes: bash launch/torchrun.sh NPROC [hydra overrides...]
#   e.g. bash launch/torchrun.sh 2 parallel.tp=2            # CPU: gloo; GPU: nccl, one process per GPU
# Standalone rendezvous on a free local port; every rank runs `python -m mtp_pretrain.cli`.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: launch/torchrun.sh NPROC [overrides...]}
shift
PY=${PYTHON:-.venv/bin/python}
# one intra-op thread per rank on CPU unless asked otherwise: N ranks share the machine's cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" -m mtp_pretrain.cli "$@"
