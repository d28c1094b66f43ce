"""Random streams and kernels across runs: a run resumed from a checkpoint continues bit for bit with dropout
(every stream restored, none drawn from afterwards), and ``trainer.deterministic=true`` reruns bit for bit."""

import os
import shutil

import pytest
import torch

from mtp_pretrain import determinism, parallel
from mtp_pretrain.trainer import Trainer
from tests.conftest import compose_config, tiny_run_overrides

DROPOUT = {"model.dropout": 0.1}  # hidden + attention dropout: both torch's and megatron's tracker stream


@pytest.fixture
def undo_configure():
    """configure(True) changes process-wide state (torch flags, MKL, the environment later children inherit):
    put it back for the tests that follow."""
    env = dict(os.environ)
    yield
    determinism.configure(False)
    os.environ.clear()
    os.environ.update(env)


def _params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.engine.module.parameters()]


def _rng(result) -> dict:
    return torch.load(result.checkpoint / "rank_00000.pt", weights_only=True)["rng"]


def test_configure_sets_deterministic_kernels_and_library_settings(undo_configure, monkeypatch):
    for name in determinism.ENV:
        monkeypatch.delenv(name, raising=False)
    os.environ["NCCL_ALGO"] = "Tree"  # a launcher's explicit choice wins over the default
    determinism.configure(True)
    state = determinism.status()
    assert state["deterministic_algorithms"] and state["cudnn_deterministic"]
    assert not torch.backends.cudnn.benchmark
    assert state["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and state["MKL_CBWR"] == "AUTO"
    assert state["NCCL_ALGO"] == "Tree"
    determinism.configure(True)  # idempotent; False then restores what was there before the first True
    determinism.configure(False)
    determinism.warm_up_vml()  # runs anywhere, any number of times
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_every_world_warms_up_vector_math_before_its_first_parallel_region(dist_world, monkeypatch):
    """MKL's vector math, first called from two threads at once, sometimes computes one thread's share on
    a low-accuracy path (a race in its set-up: up to 1 process in 3 here, fewer under load, so a test of the
    race itself could not fail reliably); every process that starts a world first calls it on one thread (determinism.warm_up_vml)."""
    calls = []
    monkeypatch.setattr(determinism, "warm_up_vml", lambda: calls.append("warm"))
    parallel.init_distributed(tp=1, pp=1, seed=0)
    assert calls == ["warm"]


def test_resume_with_dropout_continues_bit_for_bit(dist_world, synthetic_source, tmp_path):
    """Stop after the step-3 checkpoint (copied, as if steps 4+ never ran), resume in a fresh Trainer:
    every later loss, the final parameters and every random stream equal the uninterrupted run's."""
    cache = tmp_path / "cache"

    def trainer(run_dir):
        return Trainer(compose_config(*tiny_run_overrides(synthetic_source, cache, run_dir, **DROPOUT)))

    full_trainer = trainer(tmp_path / "full")
    full = full_trainer.fit()
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", part / "step_00000003")
    (part / "latest").write_text("step_00000003")
    resumed_trainer = trainer(tmp_path / "part")
    resumed = resumed_trainer.fit()

    # exact: the same kernels on bit-for-bit restored states, and nothing draws from a stream between the
    # restore and the first step (the streams differ from step 4 on if anything does)
    assert resumed.losses == full.losses[3:]
    assert resumed.head_losses == full.head_losses[3:]
    assert all(
        torch.equal(a, b) for a, b in zip(_params(full_trainer), _params(resumed_trainer), strict=True)
    )
    want, got = _rng(full), _rng(resumed)
    assert torch.equal(got["torch"], want["torch"])
    assert want["tracker"].keys() == got["tracker"].keys()
    assert all(torch.equal(got["tracker"][k], want["tracker"][k]) for k in want["tracker"])
    assert got["python"] == want["python"]
    assert all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        for a, b in zip(got["numpy"], want["numpy"], strict=True)
    )
    # the comparison can fail: dropout drew from both streams between the two checkpoints
    step3 = torch.load(part / "step_00000003" / "rank_00000.pt", weights_only=True)["rng"]
    assert not torch.equal(step3["torch"], want["torch"])
    assert not torch.equal(step3["tracker"]["model-parallel-rng"], want["tracker"]["model-parallel-rng"])


@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic_rerun_is_bit_identical(
    dist_world, synthetic_source, tmp_path, undo_configure, threads
):
    """Two fresh runs at the same thread count, deterministic kernels on (and dropout), in one process."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = []
        for name in ("a", "b"):
            overrides = tiny_run_overrides(
                synthetic_source,
                tmp_path / "cache",
                tmp_path / name,
                **DROPOUT,
                **{"trainer.deterministic": "true", "trainer.steps": 4, "trainer.val_every": 0},
            )
            trainer = Trainer(compose_config(*overrides))
            assert torch.are_deterministic_algorithms_enabled()  # configured by the Trainer itself
            runs.append((trainer.fit(), _params(trainer)))
    finally:
        torch.set_num_threads(before)
    (a, params_a), (b, params_b) = runs
    assert len(a.losses) == 4 and a.losses == b.losses and a.head_losses == b.head_losses
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b, strict=True))
