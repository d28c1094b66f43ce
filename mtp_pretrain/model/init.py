"""Layout-independent weight initialisation.

megatron initialises weights from the running RNG in creation order, so a pipeline stage that does not
build the embedding draws different numbers, and its CPU path splits SwiGLU's fused [gate; up] weight as
one matrix (rank 0 would get all of `gate`). Here every weight is drawn whole — its unsharded shape —
from a generator seeded by its *global* name, and each rank keeps its tensor-parallel shard. The same
seed therefore gives the same model under every TP x PP x DP layout, which is what makes layouts
comparable step for step (tests/integration/distributed) and checkpoints reshardable from step 0.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_SCALED = ("linear_proj.weight", "linear_fc2.weight")  # residual-branch outputs: std / sqrt(2 L)


def global_name(model: torch.nn.Module, name: str) -> str:
    """This stage's parameter name -> the name it has in the whole (unpipelined) model."""
    m = _LAYER.match(name)
    if m is None:
        return name
    number = model.decoder.layers[int(m.group(1))].layer_number  # 1-based, global
    return f"decoder.layers.{number - 1}.{name[m.end() :]}"


def _shard(
    full: torch.Tensor, param: torch.nn.Parameter, name: str, config: TransformerConfig
) -> torch.Tensor:
    """This rank's tensor-parallel piece of a whole weight."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp, rank = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    dim = param.partition_dim
    if config.gated_linear_unit and name.endswith("mlp.linear_fc1.weight"):
        # fused [gate; up]: each rank holds its slice of gate followed by its slice of up
        return torch.cat([part.chunk(tp, dim=dim)[rank] for part in full.chunk(2, dim=dim)], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


@torch.no_grad()
def init_parameters(model: torch.nn.Module, config: TransformerConfig, total_layers: int, seed: int) -> None:
    """N(0, std) for weights (std / sqrt(2 L) on residual outputs), ones for norms; layout-independent."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, param in model.named_parameters():
        if param.dim() == 1:  # RMSNorm scales
            param.fill_(1.0)
            continue
        gname = global_name(model, name)
        if (tied and gname == "output_layer.weight") or gname == "embedding_copy.weight":
            gname = "embedding.word_embeddings.weight"  # the last stage's copy of the embedding
        shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= tp
        std = config.init_method_std
        if gname.endswith(_SCALED):
            std /= math.sqrt(2.0 * total_layers)
        gen = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + zlib.crc32(gname.encode()))
        full = torch.randn(shape, generator=gen, device=param.device, dtype=torch.float32) * std
        param.copy_(_shard(full, param, gname, config))
