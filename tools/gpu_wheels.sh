#!/usr/bin/env bash
# `make gpu-wheels`: the Python wheels the GPU machine's CUDA image lacks (CPython 3.12, manylinux x86_64),
# made into the git-ignored .whl/ from the pinned list tools/gpu_wheels.txt, for tools/gpu_check.sh to
# install there without an index. Every pip call takes --no-deps: nothing here resolves, downloads or
# installs torch or a CUDA package, and nothing is installed into any environment (pip download / wheel).
# Ends with `tools/gpu_check.py wheels --dir .whl`: exactly the listed files, their total (fails above the
# budget), and every wheel's needs carried or held by the image.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"  # builds deepspeed's sdist with this env's torch (never installed)
DEST="$ROOT/.whl"
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64)
pip=("$PY" -m pip --disable-pip-version-check)
mkdir -p "$DEST"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# requirement how file KiB: the list's wheel lines (comments, image: and optional: lines left out)
grep -v '^[[:space:]]*#' tools/gpu_wheels.txt | grep -v ':' | while read -r req how file _kib; do
  [ -n "$req" ] || continue
  if [ -f "$DEST/$file" ]; then
    echo "have  $file"
    continue
  fi
  echo "make  $req ($how)"
  case "$how" in
    download)
      "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$req"
      ;;
    sdist)
      "${pip[@]}" wheel -q --no-deps --no-binary=:all: -w "$DEST" "$req"
      ;;
    sdist-torch)  # setup.py imports torch: no isolation, so it uses this env's torch and fetches none
      DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$DEST" "$req"
      ;;
    project)  # a copy: a build writes build/ and *.egg-info beside its sources (tests/integration/test_packaging.py)
      mkdir -p "$tmp/src"
      cp -a mtp_pretrain conf pyproject.toml README.md "$tmp/src/"
      find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
      "${pip[@]}" wheel -q --no-deps --no-build-isolation --no-index -w "$DEST" "$tmp/src"
      ;;
  esac
  [ -f "$DEST/$file" ] || { echo "gpu-wheels: $req did not make $file (update tools/gpu_wheels.txt)" >&2; exit 1; }
done
"$PY" tools/gpu_check.py wheels --dir "$DEST"
