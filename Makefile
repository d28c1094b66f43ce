# The two commands a fresh machine needs (see README): `make train` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv train test test-fast lint bench bench-memory bench-data bench-decode gpu-wheels

# The environment (tools/bootstrap.sh). On an image that already has CUDA torch:
# `MTP_SYSTEM_TORCH=1 PYTHON=python3 make venv` keeps that torch (README: On a GPU cluster).
venv:
	@VENV=$(VENV) bash tools/bootstrap.sh

# Main job: the CPU demo recipe (conf/experiment/cpu_demo.yaml): n=4 tiny MTP model on the embedded
# Python-stdlib corpus, CPU, a few minutes.
train: venv
	$(PY) -m mtp_pretrain.cli +experiment=cpu_demo $(ARGS)

# The whole suite (CI); the slowest tests are listed at the end.
test: venv lint
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# Single-process unit tests only (tests/unit).
test-fast: venv lint
	$(PY) -m pytest -q --durations=10 tests/unit $(PYTEST_ARGS)

# ruff's linter and its formatter (the tree is formatted: `ruff format mtp_pretrain tools tests` fixes it).
lint: venv
	$(VENV)/bin/ruff check mtp_pretrain tools tests
	$(VENV)/bin/ruff format --check mtp_pretrain tools tests

# The benchmark suite: one table of ratios, bench/results.{json,png}, README section (< 15 min on 2 cores).
bench: venv
	$(PY) tools/bench.py --readme $(ARGS)

bench-memory: venv
	$(PY) tools/bench_loss_memory.py

# Data-loader tokens/s (text / pre-tokenized shards, 0-2 workers) vs the default training step's consumption.
bench-data: venv
	$(PY) tools/bench_data.py $(ARGS)

# Greedy vs self-speculative decoding of the main job's model (make train first).
bench-decode: venv
	$(PY) tools/bench_decode.py $(ARGS)

# The wheels the GPU machine's CUDA image lacks (tools/gpu_wheels.txt) into .whl/, for tools/gpu_check.sh.
gpu-wheels: venv
	@bash tools/gpu_wheels.sh
