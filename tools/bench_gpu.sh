#!/usr/bin/env bash
# GPU benchmark of the 1B model, n=1 vs n=4 (tools/bench_gpu.py; arguments pass through, e.g. --dry-run,
# --steps 20, --micro-batch 4, --json out.json). Uses the repo's .venv when there is one, else `python`;
# installs nothing (build the venv first: `TORCH_INDEX_URL=<CUDA index> make venv`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ -x "$VENV/bin/python" ]; then
  PY="$VENV/bin/python"
else
  PY="$(command -v python || command -v python3)"
fi
cd "$ROOT"
exec "$PY" tools/bench_gpu.py "$@"
