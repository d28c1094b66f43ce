#!/usr/bin/env bash
# The one GPU check (one H200, < 6 minutes): run from the repo root on a machine whose image has CUDA torch
# (python3) but lacks this project's other packages, after `make gpu-wheels` made .whl/ here.
#   1. wheels   tools/gpu_wheels.txt against pyproject.toml and the made .whl/ (tools/gpu_check.py wheels)
#   2. install  pip install --no-index --no-deps --target into a temp folder + PYTHONPATH: the image's torch
#               stays what is imported (checked); the installed wheel's mtp-train composes a recipe
#   3. tests    pytest -m gpu tests/gpu (CUDA parity, NCCL training + resume, speculative == greedy)
#   4. bench    tools/bench_gpu.py: 1B bf16 n=1 vs n=4, sdpa vs local at T=2048
# then ONE table (tools/gpu_check.py report), last; with $OUT set, gpu_check.json and the logs under it.
# Each part runs under its own time limit (they sum to 6 minutes); a part that fails does not stop the next.
#
#   bash tools/gpu_check.sh --dry-run   CPU, no .whl/, no download (CI: tests/integration/test_gpu_check.py):
#       checks the wheel list, collects the gpu tests (they skip without CUDA), runs the bench on the tiny model.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash tools/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3)"; fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SITE="$WORK/site"
# deterministic cuBLAS for the bit-exact resume test (read when the first cuBLAS handle is made)
export PY WORK SITE PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8

part() {  # part NAME LIMIT_S FUNCTION: run FUNCTION under a time limit, its status into parts.tsv
  local name=$1 limit=$2 fn=$3 t0 rc
  echo "== $name (limit ${limit}s)"
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" bash -c "set -o pipefail; $fn"
  rc=$?
  local ms=$((($(date +%s%N) - t0) / 1000000))
  printf '%s\t%s\t%d.%03d\t%s\t%s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$limit" "$fn" >>"$WORK/parts.tsv"
}
skip() { printf '%s\t200\t0\t0\t%s\n' "$1" "$2" >>"$WORK/parts.tsv"; }

wheels() { "$PY" tools/gpu_check.py wheels "$@" --json "$WORK/wheels.json"; }
install_wheels() {  # the carried wheels beside (never over) the image's packages; the image's torch still imported
  local torch_before torch_after
  torch_before=$("$PY" -c 'import torch; print(torch.__version__, torch.__file__)') || return 1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || return 1
  torch_after=$(PYTHONPATH="$SITE" "$PY" -c 'import torch, megatron.core, deepspeed, hydra, webdataset
import mtp_pretrain; print(torch.__version__, torch.__file__)') || return 1
  echo "torch: $torch_after"
  [ "$torch_after" = "$torch_before" ] || { echo "the image's torch was replaced ($torch_before)" >&2; return 1; }
  # the installed wheel's console script composes a recipe from its own packaged conf, outside the checkout
  (cd /tmp && PYTHONPATH="$SITE" "$SITE/bin/mtp-train" --cfg job +experiment=cpu_demo >/dev/null)
}
gpu_tests() { "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/gpu "$@" 2>&1 | tee "$WORK/tests.log"; }
bench() { "$PY" tools/bench_gpu.py --json "$WORK/bench.json" "$@" 2>&1 | tee "$WORK/bench.log"; }
export -f wheels install_wheels gpu_tests bench

if [ "$DRY" = 1 ]; then
  part wheels 20 wheels
  skip install "dry run: nothing installed"
  part "tests (collect only)" 60 "gpu_tests --collect-only"
  part bench 90 "bench --dry-run"
else
  part wheels 20 "wheels --dir .whl"
  part install 40 install_wheels
  export PYTHONPATH="$ROOT:$SITE"  # the checkout's code ahead of its installed copy; the carried packages
  part tests 140 gpu_tests
  part bench 150 "bench --steps 10"
fi
echo
json=()
[ "$DRY" = 1 ] || json=(--expect-gpu)
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$WORK"/tests.log "$WORK"/bench.log "$OUT"/ 2>/dev/null
  json+=(--json "$OUT/gpu_check.json")
fi
"$PY" tools/gpu_check.py report --work "$WORK" "${json[@]}"
