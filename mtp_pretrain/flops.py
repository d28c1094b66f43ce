"""Model FLOPs per trained token and weight counts, from the model's shape; this machine's peak FLOP/s; MFU.

The one place for these formulas: the trainer and every benchmark ask here."""

from __future__ import annotations

import time

import torch

from mtp_pretrain.config import ModelConfig, ffn_hidden_size


def block_params(m: ModelConfig) -> int:
    """Weights of one Llama block (attention + SwiGLU MLP), norms excluded."""
    d, heads = m.hidden_size, m.num_attention_heads
    kv = (m.num_query_groups or heads) * (d // heads)
    return d * (d + 2 * kv) + d * d + 3 * d * ffn_hidden_size(m)


def model_params(m: ModelConfig, vocab_size: int) -> int:
    """Weights of the whole model, norms excluded: L blocks, the embedding and the unembedding (one matrix
    when they are tied). ``vocab_size`` as the caller counts it (the tokenizer's, or the padded one)."""
    embeddings = 1 if m.tie_embeddings else 2
    return m.num_layers * block_params(m) + embeddings * vocab_size * m.hidden_size


def train_flops_per_token(m: ModelConfig, n_heads: int, vocab_size: int) -> float:
    """Forward + backward FLOPs of one input position: 6 * (matmul weights touched) + attention scores.

    Trunk (L-n blocks) once, then n head blocks and n unembeddings. At equal L, n=4 and n=1 differ only
    by the (n-1) extra unembeddings (the paper's fair comparison keeps L fixed).
    """
    blocks = m.num_layers  # (L - n) trunk + n heads
    matmul = blocks * block_params(m) + n_heads * vocab_size * m.hidden_size
    attention = blocks * 2 * 2 * m.seq_len * m.hidden_size  # QK^T and AV, causal not discounted
    return 6.0 * matmul + 3.0 * attention


def peak_flops(dtype: torch.dtype = torch.float32) -> float:
    """Peak matmul FLOP/s of this device: the data-sheet figure on GPUs, the best of five 1024^3 matmuls on CPU."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        dense_bf16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
        for key, value in dense_bf16.items():
            if key in name:
                return value if dtype == torch.bfloat16 else value / 2
        return 100e12
    # from a generator of its own: a measurement must not move the global stream that dropout draws from
    a = torch.randn(1024, 1024, dtype=dtype, generator=torch.Generator().manual_seed(0))
    best = 0.0
    for _ in range(5):  # best of several short trials: robust to a background process stealing a core
        t0 = time.perf_counter()
        a @ a
        best = max(best, 2 * 1024**3 / (time.perf_counter() - t0))
    return best


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_total: float) -> float:
    """Model FLOPs utilisation, a fraction (0.45 = 45%): the model FLOPs done per second over the peak of
    every device that did them (``peak_flops(dtype)`` x the devices)."""
    return tokens_per_s * flops_per_token / peak_flops_total
