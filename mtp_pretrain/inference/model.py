"""The MTP model for inference, in plain PyTorch, with a key/value cache that can roll back.

Training runs megatron-core modules split over TP x PP ranks; inference gathers the weights into one
process (see weights.py) and runs this small decoder instead: megatron's own inference path wants
CUDA-graphs-era context objects and TP/PP groups, and none of it knows about MTP heads or rolling back a
cache. The maths is the training model's exactly (tests/inference compare the logits of every head):

    trunk:  embedding -> L-n Llama blocks (RMSNorm, GQA attention with rotate-half RoPE, SwiGLU)
    heads:  n blocks on the trunk output, then the shared final norm and the shared unembedding

The n head blocks are held *stacked* (every weight has a leading head dimension) and run as one batched
block: a speculative step computes every head for about the price of one block in kernel launches, and
greedy decoding runs the slice ``[:1]`` (head 1) only. Every block caches keys/values per row at explicit
positions, so rows of a batch may sit at different lengths and a rejected draft is rolled back by moving
the row's length back (the stale entries are overwritten before anything can attend to them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtp_pretrain import compat


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int  # the tokenizer's (padding rows of the training vocabulary are dropped)
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int  # attention heads
    num_kv_heads: int  # query groups (GQA)
    trunk_layers: int  # L - n
    mtp_heads: int  # n
    context: int  # trained sequence length: the longest prompt + generation served
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_tables(
    positions: int, head_dim: int, base: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """cos/sin of rotate-half RoPE for positions 0..positions-1: [2, positions, head_dim]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()]).to(dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (megatron's and Llama's form) of x [..., S, h, hd]; cos/sin [..., S, 1, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class StackedBlocks(torch.nn.Module):
    """m independent Llama blocks applied to m inputs at once: every weight has a leading dim m.

    A trunk block is a stack of one; the MTP heads are a stack of n. ``forward(x, ..., take=k)`` runs the
    first k blocks only (x [k, B, S, d]).
    """

    def __init__(self, cfg: DecoderConfig, m: int) -> None:
        super().__init__()
        d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
        self.cfg = cfg

        def p(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.empty(m, *shape), requires_grad=False)

        self.attn_norm, self.qkv, self.proj = p(d), p(qkv, d), p(d, cfg.num_heads * hd)
        self.mlp_norm, self.gate_up, self.down = p(d), p(2 * f, d), p(d, f)

    def forward(
        self,
        x: Tensor,
        cache: BlockCache,
        positions: Tensor,
        rotary: tuple[Tensor, Tensor],
        visible: Tensor,
        take: int,
    ) -> Tensor:
        """x [take, B, S, d] at positions [B, S]; ``visible`` [B, 1, S, T]: which cached keys each query sees."""
        cfg = self.cfg
        k_, B, S, d = x.shape  # noqa: N806
        H, G, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim  # noqa: N806
        h = rms_norm(x, self.attn_norm[:take, None, None], cfg.norm_eps)
        qkv = torch.matmul(h.view(k_, B * S, d), self.qkv[:take].transpose(1, 2)).view(
            k_, B, S, H + 2 * G, hd
        )
        q, k, v = qkv.split([H, G, G], dim=3)
        q, k = rope(q, *rotary), rope(k, *rotary)
        keys, values = cache.write(k, v, positions, visible.shape[-1], take)  # [k_, B, T, G, hd]
        attn = F.scaled_dot_product_attention(
            q.permute(0, 1, 3, 2, 4).reshape(k_ * B, H, S, hd),
            keys.permute(0, 1, 3, 2, 4).reshape(k_ * B, G, -1, hd),
            values.permute(0, 1, 3, 2, 4).reshape(k_ * B, G, -1, hd),
            attn_mask=visible if k_ == 1 else visible.repeat(k_, 1, 1, 1),
            enable_gqa=G != H,
        )  # [k_*B, H, S, hd]
        attn = attn.view(k_, B, H, S, hd).transpose(2, 3).reshape(k_, B * S, H * hd)
        x = x + torch.matmul(attn, self.proj[:take].transpose(1, 2)).view(k_, B, S, d)
        h = rms_norm(x, self.mlp_norm[:take, None, None], cfg.norm_eps)
        gate, up = torch.matmul(h.view(k_, B * S, d), self.gate_up[:take].transpose(1, 2)).chunk(2, dim=-1)
        return x + torch.matmul(F.silu(gate) * up, self.down[:take].transpose(1, 2)).view(k_, B, S, d)


class BlockCache:
    """Keys/values of one stack of m blocks for B rows: [m, B, capacity, kv heads, head dim]."""

    def __init__(
        self, m: int, batch: int, capacity: int, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (m, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, k: Tensor, v: Tensor, positions: Tensor, end: int, take: int) -> tuple[Tensor, Tensor]:
        """Store k/v [take, B, S, G, hd] at positions [B, S]; return the cache up to ``end`` (the furthest
        position + 1, checked against the capacity by the caller)."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        self.k[:take, rows, positions] = k
        self.v[:take, rows, positions] = v
        return self.k[:take, :, :end], self.v[:take, :, :end]


class KVCache:
    """Caches of every trunk block and of the head stack, plus each row's length (tokens cached).

    Entries at positions >= a row's length are stale (rejected drafts, prompt padding) and are never read:
    a query at position p only attends to positions <= p, all of which are written before it runs.
    """

    def __init__(
        self, cfg: DecoderConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.trunk = [BlockCache(1, batch, capacity, cfg, dtype, device) for _ in range(cfg.trunk_layers)]
        self.heads = BlockCache(cfg.mtp_heads, batch, capacity, cfg, dtype, device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity


class MTPDecoder(torch.nn.Module):
    """Embedding, trunk, stacked heads, shared final norm and unembedding; weights from weights.py."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.trunk = torch.nn.ModuleList(StackedBlocks(cfg, 1) for _ in range(cfg.trunk_layers))
        self.heads = StackedBlocks(cfg, cfg.mtp_heads)
        self.norm = torch.nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.unembed = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self._rope: Tensor | None = (
            None  # cos/sin tables, built on first use (after the weights' dtype/device)
        )

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.cfg, batch, capacity, self.embed.dtype, self.embed.device)

    @torch.no_grad()
    @compat.cuda_shims_paused()
    def hidden(self, tokens: Tensor, cache: KVCache, heads: int) -> Tensor:
        """Run tokens [B, S] at positions ``cache.lengths + 0..S-1`` through the trunk and the first
        ``heads`` heads, caching their keys/values (lengths are left to the caller: it decides what to
        keep). Returns the heads' normed hidden states [heads, B, S, d]."""
        positions = cache.lengths[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        end = int(positions.max()) + 1  # once per forward, not per block (a device sync on GPUs)
        if end > cache.capacity:
            raise ValueError(f"position {end - 1} is past the cache capacity {cache.capacity}")
        # a query at position p sees keys 0..p: every one of them is written by then (earlier steps or this one)
        visible = (torch.arange(end, device=tokens.device) <= positions[..., None])[:, None]  # [B, 1, S, T]
        if (
            self._rope is None or self._rope.shape[1] < cache.capacity
        ):  # computed once per size, not per layer
            cfg = self.cfg
            self._rope = rope_tables(
                max(cache.capacity, cfg.context),
                cfg.head_dim,
                cfg.rope_base,
                self.embed.dtype,
                self.embed.device,
            )
        cos, sin = self._rope[:, positions, None]  # [B, S, 1, hd] each
        x = F.embedding(tokens, self.embed)[None]
        for block, block_cache in zip(self.trunk, cache.trunk, strict=True):
            x = block(x, block_cache, positions, (cos, sin), visible, take=1)
        y = self.heads(x.expand(heads, -1, -1, -1), cache.heads, positions, (cos, sin), visible, take=heads)
        return rms_norm(y, self.norm, self.cfg.norm_eps)

    @compat.cuda_shims_paused()
    def logits(self, hidden: Tensor) -> Tensor:
        return torch.matmul(hidden, self.unembed.t())

    @torch.no_grad()
    def forward(self, tokens: Tensor, heads: int | None = None) -> Tensor:
        """Logits [heads, B, S, V] of the first ``heads`` heads over whole sequences tokens [B, S] (no cache
        kept): head i at position t predicts token t+i."""
        k = self.cfg.mtp_heads if heads is None else heads
        cache = self.new_cache(tokens.shape[0], tokens.shape[1])
        return self.logits(self.hidden(tokens, cache, k))
