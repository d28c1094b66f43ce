#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install the project into it.
# Idempotent: a stamp holding the hash of pyproject.toml skips the installs when nothing changed.
#
# Default (CI, CPU machines): a venv from PYTHON (python3.11), torch==2.13.0 installed first and pinned, so
# no later resolution can replace it with a CUDA build. TORCH_INDEX_URL picks another torch index.
#
# MTP_SYSTEM_TORCH=1 (an image that already has CUDA torch, e.g. `MTP_SYSTEM_TORCH=1 PYTHON=python3 make
# venv`): the venv sees PYTHON's packages and never installs, upgrades or replaces torch (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv}
SYSTEM_TORCH=${MTP_SYSTEM_TORCH:-0}
TORCH_SPEC="torch==2.13.0"
stamp="$VENV/.mtp-bootstrap-$(sha256sum pyproject.toml | cut -c1-16)"
[ "$SYSTEM_TORCH" = 1 ] && stamp="$stamp-system-torch"
if [ -f "$stamp" ]; then exit 0; fi
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

if [ "$SYSTEM_TORCH" = 1 ]; then
  torch_version=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null) \
    || { echo "bootstrap: MTP_SYSTEM_TORCH=1 but $PY cannot import torch (choose the interpreter with PYTHON=)" >&2; exit 1; }
  if [ -x "$VENV/bin/python" ] && ! grep -qi "include-system-site-packages *= *true" "$VENV/pyvenv.cfg"; then
    echo "bootstrap: $VENV was not made with MTP_SYSTEM_TORCH=1 (it has its own torch); delete it and re-run" >&2
    exit 1
  fi
  # --without-pip: the venv uses the image's pip and setuptools; the copies ensurepip would put in the venv
  # (setuptools 65 on Python 3.11, without bdist_wheel) would shadow them and fail the editable build.
  [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages --without-pip "$VENV"
  # --system-site-packages shows the base installation's packages; when PYTHON is itself a venv (or torch
  # lives elsewhere on its path) that is not where its torch is, so PYTHON's site directories and torch's
  # directory are added after the venv's own (site.addsitedir also runs their .pth files, as for the base).
  site_dirs=$("$PY" -c "import os, site, torch; print(*dict.fromkeys([*site.getsitepackages(),
os.path.dirname(os.path.dirname(torch.__file__))]), sep='\n')")
  venv_site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  while read -r dir; do echo "import site; site.addsitedir('$dir')"; done <<<"$site_dirs" \
    >"$venv_site/_mtp_system_torch.pth"
  # A constraint pinning the exact installed torch (local label included, e.g. 2.11.0+cu130): pip keeps the
  # installed one when it satisfies every requirement (pyproject's torch>=2.6 does), and a dependency that
  # wanted another torch fails the resolution instead of replacing it. (--no-deps would keep torch too, but
  # every other dependency would have to be listed twice.) No pip upgrade: images often have no network.
  constraints="$VENV/.mtp-torch-constraint.txt"
  echo "torch==$torch_version" >"$constraints"
  torch_pin=(-c "$constraints")
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "${pip[@]}" --upgrade pip >/dev/null
  # CPU machines get the CPU wheel; on a GPU machine set TORCH_INDEX_URL to the CUDA index you use.
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
  else
    "${pip[@]}" "$TORCH_SPEC"
  fi
  torch_pin=("$TORCH_SPEC")
fi
# --no-build-isolation: deepspeed's sdist build imports torch; isolation would fetch another torch.
"${pip[@]}" --no-build-isolation "${torch_pin[@]}" -e ".[dev]"
if [ "$SYSTEM_TORCH" = 1 ]; then  # the guarantee, checked: the venv imports PYTHON's torch, not a copy of its own
  where=$("$VENV/bin/python" -c "import sys, torch; print(torch.__version__, torch.__file__.startswith(sys.prefix + '/'))")
  [ "$where" = "$torch_version False" ] \
    || { echo "bootstrap: $VENV imports torch ($where), not $PY's $torch_version; delete $VENV and re-run" >&2; exit 1; }
fi
"$VENV/bin/python" -c "import torch, megatron.core, deepspeed, webdataset, tokenizers, hydra" \
  || { echo "bootstrap: the environment in $VENV does not import; delete it and re-run" >&2; exit 1; }
rm -f "$VENV"/.mtp-bootstrap-*
touch "$stamp"
echo "bootstrap: environment ready in $VENV"
