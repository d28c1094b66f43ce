"""CPU shims for megatron-core (only active without CUDA): devices, type names, the RNG tracker, fusions."""

import pytest
import torch
from megatron.core import tensor_parallel

from mtp_pretrain import compat
from mtp_pretrain.config import ModelConfig, MTPConfig
from mtp_pretrain.model.mtp_model import transformer_config

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are a no-op on CUDA machines")


def test_cuda_device_arguments_land_on_cpu(dist_world):
    assert compat.device() == torch.device("cpu")
    made = [
        torch.empty(3, device="cuda"),
        torch.zeros(2, device=torch.device("cuda", 0)),
        torch.ones(2, device=torch.cuda.current_device()),  # a bare ordinal, as megatron passes it
        torch.zeros(2).cuda(),
        torch.zeros(2).to("cuda"),
        torch.zeros(2).to(device="cuda"),
        torch.zeros(2).new_zeros((3,), device="cuda"),
        torch.zeros(2).new_empty((3,), device=0),
        torch.arange(4, device="cuda:0"),
        torch.empty(4, pin_memory=True),
    ]
    for t in made:
        assert t.device.type == "cpu"
    assert torch.equal(torch.arange(4, device="cuda"), torch.arange(4))


def test_new_tensor_with_int_sizes(dist_world):
    assert torch.zeros(2).new_zeros(3).shape == (3,)
    assert torch.zeros(2).new_empty(2, 3).shape == (2, 3)


class _MakesCudaTensorInBackward(torch.autograd.Function):
    """Like megatron's CheckpointFunction (activation recompute): creates tensors on "cuda" in backward."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.full((1,), 2.0, device=torch.cuda.current_device())


def test_cuda_device_inside_backward_lands_on_cpu(dist_world):
    x = torch.ones(3, requires_grad=True)
    _MakesCudaTensorInBackward.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))  # d(sum)/d(out) = 1, times the 2 made in backward
    (g,) = torch.autograd.grad(_MakesCudaTensorInBackward.apply(x).sum(), x)
    assert torch.equal(g, torch.full((3,), 2.0))


def test_tensor_type_reports_the_cuda_name(dist_world):
    assert torch.zeros(2).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(2, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    assert torch.zeros(2, dtype=torch.long).type() == "torch.LongTensor"  # only the float types are renamed
    converted = torch.zeros(2).type(torch.float64)  # the conversion form still converts
    assert converted.dtype == torch.float64 and converted.device.type == "cpu"


def test_shims_pause_for_code_that_never_names_cuda(dist_world):
    t = torch.zeros(2)
    with compat.cuda_shims_paused():
        assert t.type() == "torch.FloatTensor"  # the mode is off inside
        with compat.cuda_shims_paused():  # nested: still off, and the outer exit restores it once
            assert t.type() == "torch.FloatTensor"
    assert t.type() == "torch.cuda.FloatTensor"


def test_stream_and_sync_stand_ins(dist_world):
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.Stream())
    assert torch.cuda.Event().query() is True
    with torch.cuda.stream(stream):
        pass


def test_tracker_forks_the_cpu_generator(dist_world):
    tracker = tensor_parallel.get_cuda_rng_tracker()
    name = "model-parallel-rng"
    # added by model_parallel_cuda_manual_seed (dist_world)
    assert tracker.is_initialized() and name in tracker.get_states()
    saved_tracker, saved_outer = tracker.get_states(), torch.get_rng_state()
    try:
        outer = torch.get_rng_state()
        with tracker.fork():
            assert torch.equal(torch.get_rng_state(), saved_tracker[name])  # the CPU generator is switched
            inside = torch.rand(6)
        after_fork = torch.rand(6)
        torch.set_rng_state(outer)
        assert torch.equal(torch.rand(6), after_fork)  # drawing in the fork did not move the outer stream
        assert not torch.equal(inside, after_fork)

        with tracker.fork():  # the fork's own stream advanced
            next_inside = torch.rand(6)
        assert not torch.equal(next_inside, inside)

        tracker.set_states(saved_tracker)  # reproducible from the tracker's state
        with tracker.fork():
            assert torch.equal(torch.rand(6), inside)
            assert torch.equal(torch.rand(6), next_inside)
    finally:
        tracker.set_states(saved_tracker)
        torch.set_rng_state(saved_outer)


def test_tracker_rejects_duplicates_and_unknown_names(dist_world):
    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = tracker.get_states()
    seed = 987654
    try:
        tracker.add("test-stream", seed)
        with pytest.raises(RuntimeError):
            tracker.add("test-stream", seed + 1)
        with pytest.raises(RuntimeError):
            tracker.add("other-stream", seed)
        with pytest.raises(RuntimeError), tracker.fork("never-added"):
            pass
    finally:
        tracker.set_states(saved)
        tracker.seeds_.discard(seed)


def test_cpu_safe_overrides_turn_fusions_off(dist_world):
    overrides = compat.cpu_safe_config_overrides()
    fusions = [k for k in overrides if "fusion" in k]
    assert {
        "bias_activation_fusion",
        "masked_softmax_fusion",
        "apply_rope_fusion",
        "bias_dropout_fusion",
        "gradient_accumulation_fusion",
        "cross_entropy_loss_fusion",
    } <= set(fusions)
    assert not any(overrides[k] for k in fusions)
    assert overrides["use_cpu_initialization"] is True
    model = ModelConfig(preset="t", num_layers=3, hidden_size=32, num_attention_heads=2, seq_len=8)
    tconfig = transformer_config(model, MTPConfig(n=1))  # the model factory applies them
    for key, value in overrides.items():
        assert getattr(tconfig, key) == value, key
