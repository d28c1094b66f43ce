"""The vocabulary as tensor-parallel ranks hold it: padded to equal aligned shards, masked where padded, and
the argmax across shards. Used by the model (logits for inference/eval) and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import Tensor


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocabulary padded so every tensor-parallel shard is equal and aligned (megatron's convention)."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def vocab_parallel_argmax(logits: Tensor) -> Tensor:
    """argmax over a vocabulary split across tensor-parallel ranks (global token ids)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    local_max, local_idx = logits.max(dim=-1)
    if tp == 1:
        return local_idx
    group = parallel_state.get_tensor_model_parallel_group()
    local_idx = local_idx + parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    global_max = local_max.clone()
    torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=group)
    # ties: the lowest id wins, as torch.argmax does on one rank
    candidate = torch.where(local_max == global_max, local_idx, torch.full_like(local_idx, 2**62))
    torch.distributed.all_reduce(candidate, op=torch.distributed.ReduceOp.MIN, group=group)
    return candidate


def mask_vocab_padding(logits: Tensor, vocab_limit: int | None) -> Tensor:
    """Vocab-parallel logits [..., V/tp] with the columns of padding ids (>= vocab_limit) at -inf: the padded
    vocabulary (a multiple of 128 x TP) then changes nothing, so any TP layout computes the same loss."""
    width = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    if vocab_limit is None or start + width <= vocab_limit:
        return logits
    ids = torch.arange(start, start + width, device=logits.device)
    return logits.masked_fill(ids >= vocab_limit, float("-inf"))


def vocab_parallel_embedding(ids: Tensor, weight: Tensor) -> Tensor:
    """Rows of a vocab-parallel embedding table [V/tp, d] for token ids [...] -> [..., d], summed over TP ranks
    (megatron's VocabParallelEmbedding on a weight passed in: the sequential MTP heads look tokens up in the
    trunk's table, or in the output layer's when it is the same tied table)."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return F.embedding(ids, weight)
    start = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
    outside = (ids < start) | (ids >= start + weight.shape[0])
    out = F.embedding(torch.where(outside, 0, ids - start), weight)
    out = out.masked_fill(outside[..., None], 0.0)
    return reduce_from_tensor_model_parallel_region(out)
