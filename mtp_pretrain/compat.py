"""The ONLY place that patches megatron-core's CUDA assumptions so it runs on CPU with gloo.

Everything here is a no-op when CUDA is available: on GPUs megatron-core runs unpatched. On CPU we
 - route megatron's model-parallel "CUDA" RNG tracker (dropout, activation recompute) to the CPU generator;
 - make `torch.cuda.current_device()`, streams, events and `synchronize()` harmless stand-ins;
 - rewrite hard-coded CUDA devices (`device="cuda"`, `.cuda()`, `pin_memory=True`) to CPU with one
   process-wide TorchFunctionMode (measured ~15-25% overhead on a tiny model, CPU only);
 - answer `tensor.type()` as the CUDA type name, because megatron's optimizer and grad clipping assert
   `param.type() == 'torch.cuda.FloatTensor'`.
Fusion flags that need CUDA kernels are switched off by `cpu_safe_config_overrides()`, which the model
factory applies to the TransformerConfig.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on: its local GPU under CUDA, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cpu_safe_config_overrides() -> dict[str, Any]:
    """TransformerConfig fields that must be off without CUDA kernels (empty dict on GPUs)."""
    if cuda_available():
        return {}
    return dict(
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        cross_entropy_loss_fusion=False,
        batch_p2p_sync=False,
        use_cpu_initialization=True,
    )


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)  # a bare index means a CUDA ordinal


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made while it is active."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if (
            func is torch.Tensor.to
            and len(args) > 1
            and _is_cuda_device(args[1])
            and not isinstance(args[1], int)
        ):
            args = (args[0], "cpu", *args[2:])  # .to("cuda") / .to(torch.device("cuda")); .to(int) is rare
        return func(*args, **kwargs)


class _NoStream:
    """Stand-in for torch.cuda.Stream / Event: CPU work is synchronous, so every wait is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: None if name != "query" else True


class _CpuRngTracker:
    """Megatron's CudaRNGStatesTracker, on the CPU generator: named RNG states forked for a region."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"RNG state {name!r} or seed {seed} already exists")
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def apply() -> None:
    """Install the CPU shims once per process; does nothing when CUDA is available."""
    global _applied
    if _applied or cuda_available():
        return
    _applied = True

    torch.cuda.current_device = lambda: 0  # an ordinal; the mode maps it to CPU wherever it is a device
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Stream = _NoStream  # type: ignore[misc,assignment]
    torch.cuda.Event = _NoStream  # type: ignore[misc,assignment]
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.default_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None

    from megatron.core.tensor_parallel import random as mrandom

    def get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)

    mrandom._get_cuda_rng_state = get_rng_state
    mrandom._set_cuda_rng_state = set_rng_state
    mrandom.CudaRNGStatesTracker = _CpuRngTracker  # type: ignore[misc,assignment]
    mrandom._CUDA_RNG_STATE_TRACKER = None  # rebuilt lazily with the CPU tracker class

    # The autograd engine calls back into Python (autograd Functions' backward, activation recompute's
    # re-run forward) while the mode is switched off for handling `backward`/`grad`: run it under the mode.
    from torch.autograd import graph

    run_backward = graph._engine_run_backward

    def run_backward_on_cpu(*args: Any, **kwargs: Any) -> Any:
        with _CudaToCpuMode():
            return run_backward(*args, **kwargs)

    graph._engine_run_backward = run_backward_on_cpu
    torch.autograd._engine_run_backward = run_backward_on_cpu  # the name torch.autograd imported

    # Process-wide: entered once and never exited (the mode stack is per thread; training runs on this one).
    _CudaToCpuMode().__enter__()


@contextlib.contextmanager
def cuda_shims_paused() -> Iterator[None]:
    """Run a block without the CUDA->CPU TorchFunctionMode, for our own code that never names CUDA (the
    inference decoder): the mode's Python call on every torch op doubled a small decoder's step time."""
    if isinstance(torch.overrides._get_current_function_mode(), _CudaToCpuMode):
        with torch.overrides._pop_mode_temporarily():
            yield
    else:
        yield


def apply_deepspeed() -> None:
    """DeepSpeed on CPU: its torch comm backend JIT-compiles a shared-memory all-reduce op the first time it
    starts on a machine (~2.5 min measured) that gloo training never needs; skip building it. Before
    ``import deepspeed`` picks an accelerator, pin the CPU one. No-op with CUDA."""
    if cuda_available():
        return
    import importlib
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm's attribute `torch` is torch itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
