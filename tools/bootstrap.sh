#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install the project into it.
# Idempotent: a stamp holding the hash of pyproject.toml skips the installs when nothing changed.
# torch is installed first and pinned, so no later resolution can replace it with a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv}
TORCH_SPEC="torch==2.13.0"
stamp="$VENV/.mtp-bootstrap-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip >/dev/null
# CPU machines get the CPU wheel; on a GPU machine set TORCH_INDEX_URL to the CUDA index you use.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
else
  "${pip[@]}" "$TORCH_SPEC"
fi
# --no-build-isolation: deepspeed's sdist build imports torch; isolation would fetch another torch.
"${pip[@]}" --no-build-isolation "$TORCH_SPEC" -e ".[dev]"
"$VENV/bin/python" -c "import torch, megatron.core, deepspeed, webdataset, tokenizers, hydra" \
  || { echo "bootstrap: the environment in $VENV does not import; delete it and re-run" >&2; exit 1; }
rm -f "$VENV"/.mtp-bootstrap-*
touch "$stamp"
echo "bootstrap: environment ready in $VENV"
