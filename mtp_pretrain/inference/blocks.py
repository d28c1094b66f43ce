"""The inference decoder's building blocks: its config, RMSNorm, rotate-half RoPE, stacks of Llama blocks
and their key/value caches at explicit positions (model.py puts them together, heads.py runs the heads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

HEAD_TYPES = ("parallel", "linear", "causal", "anticausal", "sequential")  # mtp_pretrain/model/heads.py


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
    head_type: str = "parallel"  # mtp.head_type: what heads 2..n are and read (heads.py)

    def __post_init__(self) -> None:
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type {self.head_type!r}: expected one of {', '.join(HEAD_TYPES)}")

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


@dataclass
class Frame:
    """Where one forward's queries sit: ``positions`` [B, S] (explicit per row), their RoPE ``rotary``
    (cos, sin) [B, S, 1, hd] each, and ``visible`` [B, 1, S, end]: the cached keys each query attends to
    (positions <= its own, all written by the time it runs)."""

    positions: Tensor
    rotary: tuple[Tensor, Tensor]
    visible: Tensor

    @property
    def end(self) -> int:
        return self.visible.shape[-1]


class StackedBlocks(torch.nn.Module):
    """m independent Llama blocks applied to m inputs at once: every weight has a leading dim m.

    A trunk block is a stack of one; the MTP heads are a stack of n. ``forward(x, ..., select=s)`` runs the
    blocks ``s`` only (a slice; x [len(s), B, S, d]).
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

    def forward(self, x: Tensor, cache: BlockCache, frame: Frame, select: slice) -> Tensor:
        """x [k, B, S, d] through blocks ``select`` (k of them) at ``frame``, caching their keys/values."""
        cfg = self.cfg
        k_, B, S, d = x.shape  # noqa: N806
        H, G, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim  # noqa: N806
        h = rms_norm(x, self.attn_norm[select, None, None], cfg.norm_eps)
        qkv = torch.matmul(h.view(k_, B * S, d), self.qkv[select].transpose(1, 2)).view(
            k_, B, S, H + 2 * G, hd
        )
        q, k, v = qkv.split([H, G, G], dim=3)
        q, k = rope(q, *frame.rotary), rope(k, *frame.rotary)
        keys, values = cache.write(k, v, frame.positions, frame.end, select)  # [k_, B, T, G, hd]
        attn = F.scaled_dot_product_attention(
            q.permute(0, 1, 3, 2, 4).reshape(k_ * B, H, S, hd),
            keys.permute(0, 1, 3, 2, 4).reshape(k_ * B, G, -1, hd),
            values.permute(0, 1, 3, 2, 4).reshape(k_ * B, G, -1, hd),
            attn_mask=frame.visible if k_ == 1 else frame.visible.repeat(k_, 1, 1, 1),
            enable_gqa=G != H,
        )  # [k_*B, H, S, hd]
        attn = attn.view(k_, B, H, S, hd).transpose(2, 3).reshape(k_, B * S, H * hd)
        x = x + torch.matmul(attn, self.proj[select].transpose(1, 2)).view(k_, B, S, d)
        h = rms_norm(x, self.mlp_norm[select, None, None], cfg.norm_eps)
        gate, up = torch.matmul(h.view(k_, B * S, d), self.gate_up[select].transpose(1, 2)).chunk(2, dim=-1)
        return x + torch.matmul(F.silu(gate) * up, self.down[select].transpose(1, 2)).view(k_, B, S, d)


class BlockCache:
    """Keys/values of one stack of m blocks for B rows: [m, B, capacity, kv heads, head dim]."""

    def __init__(
        self, m: int, batch: int, capacity: int, cfg: DecoderConfig, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (m, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(
        self, k: Tensor, v: Tensor, positions: Tensor, end: int, select: slice
    ) -> tuple[Tensor, Tensor]:
        """Store k/v [k, B, S, G, hd] of blocks ``select`` at positions [B, S]; return their cache up to
        ``end`` (the furthest position + 1, checked against the capacity by the caller)."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        self.k[select, rows, positions] = k
        self.v[select, rows, positions] = v
        return self.k[select, :, :end], self.v[select, :, :end]
