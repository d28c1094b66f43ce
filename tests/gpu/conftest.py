"""tests/gpu (``pytest -m gpu``, run by tools/gpu_check.sh): the CUDA counterparts of CPU tests. Without a
CUDA device every test here skips before any fixture builds a model, so `make test` pays only collection."""

from __future__ import annotations

import os

import pytest
import torch

# read when the first cuBLAS handle is made: deterministic GEMM workspaces for the bit-exact resume test
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(scope="session", autouse=True)
def cuda_only():
    """Skip without CUDA (session scope and autouse: before the session fixtures that train); with it, fp32
    matmuls in true fp32 (no TF32), so the fp32 bounds here are the same ulp counts as on CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (tools/gpu_check.sh runs these on a GPU machine)")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
