"""The inference decoder's MTP heads, one class per ``mtp.head_type`` (mtp_pretrain/model/heads.py defines
each design; these compute the same functions). h is the trunk output, o_k head k's block output before
the norm, y_k = norm(o_k) with the shared final norm unless said otherwise:

    parallel    head k = block_k(h): the n blocks are held stacked and run as one batched block
    linear      head 1 = block_1(h), head k = W_k h (k >= 2)
    causal      head 1 = block_1(h), head k = block_k(o_{k-1}): run one after another
    anticausal  head n = block_n(h), head k = block_k(o_{k+1}): every head runs for any of them (head 1 too)
    sequential  head 1 = block_1(h); head k = y_k = final_norm_k(block_k(x_k)), own final norms, with
                x_k = eh_proj([enorm(e_{t+k-1}); hnorm(y_{k-1})]) (e_j: the embedding of token j)

Every head block keeps keys/values in its own slot of the cache's head stack (``KVCache.heads``, one slot
per block, none for the linear heads). Sequential head k at position t reads token t+k-1, past the tokens
run so far: it reads them from ``KVCache.tokens`` (model.py), where decoding puts its pending token and
drafts (``SequentialHeads.chain``) and a whole-sequence forward leaves id 0 past the end, megatron's
convention that ``MTPModel.head_logits`` keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from mtp_pretrain.inference.blocks import DecoderConfig, Frame, StackedBlocks, rms_norm

if TYPE_CHECKING:
    from mtp_pretrain.inference.model import KVCache


def head_blocks(cfg: DecoderConfig) -> int:
    """Transformer blocks among the heads (cache slots): head 1's alone for linear heads, else one each."""
    return 1 if cfg.head_type == "linear" else cfg.mtp_heads


def _param(*shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(*shape), requires_grad=False)


class Heads(torch.nn.Module):
    """Parallel heads (and what every type shares): the head blocks, stacked, and the shared final norm."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = StackedBlocks(cfg, head_blocks(cfg))
        self.norm = _param(cfg.hidden_size)

    def normed(self, o: Tensor) -> Tensor:
        return rms_norm(o, self.norm, self.cfg.norm_eps)

    def block(self, i: int, x: Tensor, cache: KVCache, frame: Frame) -> Tensor:
        """Head block i (0-based) alone on x [B, S, d]."""
        return self.blocks(x[None], cache.heads, frame, slice(i, i + 1))[0]

    def forward(self, h: Tensor, cache: KVCache, frame: Frame, heads: int, embed: Tensor) -> Tensor:
        """The normed hidden states [heads, B, S, d] of heads 1..``heads`` on trunk output h [B, S, d] at
        ``frame`` (``embed``: the word embedding, which sequential heads read)."""
        o = self.blocks(h.expand(heads, -1, -1, -1), cache.heads, frame, slice(0, heads))
        return self.normed(o)


class LinearHeads(Heads):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(cfg)
        self.linear = _param(cfg.mtp_heads - 1, cfg.hidden_size, cfg.hidden_size)  # W_2..W_n

    def forward(self, h: Tensor, cache: KVCache, frame: Frame, heads: int, embed: Tensor) -> Tensor:
        B, S, d = h.shape  # noqa: N806
        first = self.block(0, h, cache, frame)[None]
        rest = torch.matmul(h.reshape(B * S, d), self.linear[: heads - 1].transpose(1, 2))
        return self.normed(torch.cat([first, rest.view(heads - 1, B, S, d)]))


class ChainedHeads(Heads):
    """causal (head k reads o_{k-1}) or anticausal (head k reads o_{k+1}, head n reads h)."""

    def forward(self, h: Tensor, cache: KVCache, frame: Frame, heads: int, embed: Tensor) -> Tensor:
        n = self.cfg.mtp_heads
        # anticausal: head 1 is the end of the chain, so every head runs whatever is asked for
        order = range(n - 1, -1, -1) if self.cfg.head_type == "anticausal" else range(heads)
        out, x = {}, h
        for i in order:
            x = out[i] = self.block(i, x, cache, frame)
        return self.normed(torch.stack([out[i] for i in range(heads)]))


class SequentialHeads(Heads):
    """DeepSeek-V3's MTP modules after head 1 (megatron-core's MultiTokenPredictionLayer): per head k >= 2 an
    ``enorm``, ``hnorm``, ``eh_proj`` [d, 2d], block (slot k-1 of the stack) and its own ``final_norm``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(cfg)
        m, d = cfg.mtp_heads - 1, cfg.hidden_size
        self.enorm, self.hnorm, self.final_norm = _param(m, d), _param(m, d), _param(m, d)
        self.eh_proj = _param(m, d, 2 * d)

    def forward(self, h: Tensor, cache: KVCache, frame: Frame, heads: int, embed: Tensor) -> Tensor:
        y = self.normed(self.block(0, h, cache, frame))
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        cache.first[rows, frame.positions] = y  # what head 2 reads when it drafts later (model.py)
        return torch.stack([y, *self.chain(y, cache, frame, heads, embed)[0]])

    def chain(
        self,
        y: Tensor,
        cache: KVCache,
        frame: Frame,
        heads: int,
        embed: Tensor,
        at: Tensor | None = None,
        unembed: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Heads 2..``heads`` on head 1's normed output y [B, S, d] at ``frame``: head k at position p embeds
        ``cache.tokens[p + k - 1]``. Returns their normed outputs (each [B, S, d]) and, drafting (``at`` [B]:
        the index of each row's standing position t in S, ``unembed``: the output weight), their logits
        [B, V] at t: head k's argmax is written as token t+k before head k+1, which embeds it, runs."""
        eps, ys, logits = self.cfg.norm_eps, [], []
        rows = torch.arange(y.shape[0], device=y.device)
        for i in range(1, heads):  # head k = i + 1, its parameters at i - 1
            embedded = rms_norm(
                F.embedding(cache.tokens.gather(1, frame.positions + i), embed), self.enorm[i - 1], eps
            )
            x = torch.matmul(
                torch.cat([embedded, rms_norm(y, self.hnorm[i - 1], eps)], -1), self.eh_proj[i - 1].t()
            )
            y = rms_norm(self.block(i, x, cache, frame), self.final_norm[i - 1], eps)
            ys.append(y)
            if at is not None:
                logits.append(torch.matmul(y[rows, at], unembed.t()))
                cache.tokens[rows, frame.positions[rows, at] + i + 1] = logits[-1].argmax(-1)
        return ys, logits


def build_heads(cfg: DecoderConfig) -> Heads:
    kind = {"linear": LinearHeads, "causal": ChainedHeads, "anticausal": ChainedHeads}
    return {**kind, "sequential": SequentialHeads}.get(cfg.head_type, Heads)(cfg)
