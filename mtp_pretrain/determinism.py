"""trainer.deterministic: bit-identical reruns on the same hardware and thread count."""

from __future__ import annotations

import torch


def configure(enabled: bool) -> None:
    """Select deterministic kernels for this process (before the model is built)."""
    if enabled:
        torch.use_deterministic_algorithms(True)
