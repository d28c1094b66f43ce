"""On CUDA: the Trainer trains through NCCL (a world of one), and a run resumed from its step-3 checkpoint
continues the same curve: within fp32 noise by default, bit for bit under deterministic algorithms."""

import shutil

import torch
import torch.distributed as dist

from mtp_pretrain.trainer import Trainer
from tests.conftest import compose_config, tiny_run_overrides


def _full_and_resumed(source, tmp_path):
    """A 6-step run, then a run that stopped after its step-3 checkpoint and resumes (as test_trainer.py)."""
    cache = tmp_path / "cache"
    full = Trainer(compose_config(*tiny_run_overrides(source, cache, tmp_path / "full"))).fit()
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", part / "step_00000003")
    (part / "latest").write_text("step_00000003")
    resumed = Trainer(compose_config(*tiny_run_overrides(source, cache, tmp_path / "part"))).fit()
    return full, resumed


def test_nccl_training_resumes_within_fp32_noise(dist_world, synthetic_source, tmp_path):
    full, resumed = _full_and_resumed(synthetic_source, tmp_path)
    assert dist.get_backend() == "nccl"
    assert full.step == 6 and len(full.losses) == 6 and full.losses[-1] < full.losses[0]  # it learns
    assert resumed.step == 6 and len(resumed.losses) == 3
    # every state restored bit for bit; CUDA's atomics (embedding backward, reductions) may add the same fp32
    # terms in another order on each run: a few ulps per gradient entry, carried through 3 Adam steps
    # (update ~ lr * g / sqrt(v), so relative noise stays relative); 1e-5 of the loss is ~80 fp32 ulps
    torch.testing.assert_close(resumed.losses, full.losses[3:], rtol=1e-5, atol=0)


def test_nccl_training_resumes_bit_exact_when_deterministic(dist_world, synthetic_source, tmp_path):
    torch.use_deterministic_algorithms(True)  # CUBLAS_WORKSPACE_CONFIG: tests/gpu/conftest.py
    try:
        full, resumed = _full_and_resumed(synthetic_source, tmp_path)
    finally:
        torch.use_deterministic_algorithms(False)
    # exact: the same kernels, each deterministic, on bit-for-bit restored states
    assert resumed.losses == full.losses[3:]
    assert resumed.head_losses == full.head_losses[3:]
    final = [torch.load(r.checkpoint / "trainer.pt", weights_only=True)["trainer"] for r in (full, resumed)]
    assert final[0] == final[1]
