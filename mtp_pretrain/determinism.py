"""trainer.deterministic: bit-identical reruns on the same hardware, software and thread count.

Seeds and restored RNG streams make every *input* of a run the same; what can still differ is the order in
which a kernel adds floating-point numbers, or which implementation it runs. Every run, deterministic or
not, gets :func:`warm_up_vml` (an MKL start-up race that made ~1 in 4 CPU processes differ from step 1).
:func:`configure` (``trainer.deterministic=true``) removes each further source we know of:

- torch kernels that accumulate in no fixed order (CUDA atomics: ``index_add_``, ``scatter_add_``, the
  attention backwards; on CPU ``index_put_(accumulate=True)``, the backward of advanced indexing):
  ``torch.use_deterministic_algorithms`` picks deterministic variants, or raises naming an op that has none;
  new tensors' memory is filled (NaN), so a read of uninitialised memory cannot differ silently.
- cuDNN: no autotuning, deterministic algorithms only.
- cuBLAS: split-K GEMMs share one workspace between streams -> ``CUBLAS_WORKSPACE_CONFIG=:4096:8``.
- NCCL: in-network reductions (NVLS on NVSwitch, CollNet/SHARP) combine ranks in no fixed order ->
  ``NCCL_ALGO=Ring`` (a fixed order of ranks for every message size).
- Transformer Engine attention (``model.attention=te``): ``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0``.
- MKL on CPU (its reproducibility conditions): dynamic threading off, since a GEMM run on fewer threads than
  set splits its reduction differently (``MKL_DYNAMIC``/``OMP_DYNAMIC=FALSE``, and at once through
  ``MKL_Set_Dynamic``); ``MKL_CBWR=AUTO``: one code path per CPU, not chosen at run time (e.g. by memory
  alignment). torch's own CPU kernels split work by the thread count only: same ``OMP_NUM_THREADS``, same sums.

Environment variables are read by their library once: cuBLAS when its first handle is made (the first GEMM on
a device), NCCL when a communicator is made (the first collective), MKL at its first call. ``configure``
runs first thing in ``Trainer.__init__``, before any of these in a ``mtp-train`` process, so setting them here
works there (``MKL_VERBOSE=1`` shows ``CNR:AUTO Dyn:0`` on every GEMM); a process that already ran a GEMM (a
notebook, a test session) keeps MKL's code path. Values already exported win: a launcher may choose e.g.
``NCCL_ALGO=Tree``.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

# read by cuBLAS / NCCL / Transformer Engine / MKL / OpenMP when they start (see the module docstring)
ENV = {
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    "NCCL_ALGO": "Ring",
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
    "MKL_CBWR": "AUTO",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}

_saved: dict | None = None  # the process's settings before configure(True), restored by configure(False)


def _mkl() -> ctypes.CDLL | None:
    """The MKL that torch's CPU kernels call (linked into libtorch_cpu), or None in builds without MKL."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        lib.MKL_Set_Dynamic  # noqa: B018 (exported by MKL's service layer; absent: MKL linked differently)
    except (OSError, AttributeError):
        return None
    return lib


def _set_mkl_dynamic(on: bool) -> None:
    lib = _mkl()
    if lib is not None:
        lib.MKL_Set_Dynamic(int(on))


def warm_up_vml() -> None:
    """Initialise MKL's vector math (torch's CPU ``cos``/``sin``/``exp``/...) on this thread, before a
    parallel region first calls it. Every run needs it, deterministic or not; ``init_distributed`` calls it.

    Measured (torch 2.13 CPU wheel, MKL 2024.2, 2 threads): when a process's first vector-math call is split
    over two OpenMP threads, in up to one process in three the second thread computes its half of that one
    call on a low-accuracy path (cos off by 1.5e-4 instead of 3.5e-8); later calls are right. In training that
    call is the first RoPE ``cos`` (layer 1's queries at step 1), so such a run (or a resumed one) differs
    from every other from step 1 on. A call on this thread alone first (below any parallel grain size) makes
    that never happen: 0 of 56 processes, against 25 of 90 without; in training 0 of 26 fresh 2-thread runs
    of the CPU demo model differed, against 9 of 40."""
    if torch.backends.mkl.is_available():
        x = torch.zeros(8)
        for fn in (torch.exp, torch.cos, torch.sin):
            fn(x)


def configure(enabled: bool) -> None:
    """``enabled``: deterministic kernels and library settings for this process, before the first kernel
    runs (see the module docstring). ``False`` undoes an earlier ``configure(True)`` of this process (the
    exported environment stays: it only matters to libraries that have not started yet)."""
    global _saved
    if not enabled:
        if _saved is not None:
            torch.use_deterministic_algorithms(_saved["algorithms"], warn_only=_saved["warn_only"])
            torch.backends.cudnn.deterministic = _saved["cudnn_deterministic"]
            torch.backends.cudnn.benchmark = _saved["cudnn_benchmark"]
            _set_mkl_dynamic(True)  # MKL's default
            _saved = None
        return
    if _saved is None:
        _saved = {
            "algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        }
    for name, value in ENV.items():
        os.environ.setdefault(name, value)
    # raise, not warn: an op without a deterministic variant would break the promise silently
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    _set_mkl_dynamic(False)


def status() -> dict[str, object]:
    """What is in effect now: torch's flags, the variables of :data:`ENV` and the intra-op thread count (a
    rerun is bit-identical only at the same count). For the run log and tests."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "threads": torch.get_num_threads(),
        **{name: os.environ.get(name) for name in ENV},
    }
