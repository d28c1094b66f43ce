"""The MTP model for inference, in plain PyTorch, with a key/value cache that can roll back.

Training runs megatron-core modules split over TP x PP ranks; inference gathers the weights into one
process (see weights.py) and runs this small decoder instead: megatron's own inference path wants
CUDA-graphs-era context objects and TP/PP groups, and none of it knows about MTP heads or rolling back a
cache. The maths is the training model's exactly (tests/inference compare the logits of every head):

    trunk:  embedding -> L-n Llama blocks (RMSNorm, GQA attention with rotate-half RoPE, SwiGLU)
    heads:  the n heads of ``head_type`` (heads.py), the shared final norm and the shared unembedding

Parallel heads are held *stacked* (every weight has a leading head dimension) and run as one batched
block: a speculative step computes every head for about the price of one block in kernel launches, and
greedy decoding runs the slice ``[:1]`` (head 1) only; the chained types run their blocks one after
another. Every block caches keys/values per row at explicit positions, so rows of a batch may sit at
different lengths and a rejected draft is rolled back by moving the row's length back (the stale entries
are overwritten before anything can attend to them).

Drafting (:meth:`MTPDecoder.draft_logits`): heads 2..n of every type but sequential depend on the tokens up
to where they stand only, so the forward that verifies a block computes the next drafts too. Sequential
head k standing at t reads token t+k-1, which is known only once heads 2..k-1 drafted it: their drafts run
after the verifying forward, one head after another, over a window of positions that ends at t and starts
at the oldest position whose head entries were computed from a token not known then (see
:meth:`MTPDecoder._sequential_drafts`); where drafts 2..k-1 are right, head k's output equals the
training model's on the true text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtp_pretrain import compat
from mtp_pretrain.inference.blocks import (  # noqa: F401 - re-exported: the decoder's public parts
    HEAD_TYPES,
    BlockCache,
    DecoderConfig,
    Frame,
    StackedBlocks,
    rms_norm,
    rope,
    rope_tables,
)
from mtp_pretrain.inference.heads import build_heads, head_blocks


class KVCache:
    """Caches of every trunk block and of the head blocks, plus each row's length (tokens cached).

    Entries at positions >= a row's length are stale (rejected drafts, prompt padding) and are never read:
    a query at position p only attends to positions <= p, all of which are written before it runs.
    Sequential heads also keep, per row and position, the tokens (accepted, pending, drafted: what heads
    2..n read), head 1's normed output (what head 2 reads), and ``redo_from``: the oldest position whose head
    2..n entries were computed from a token that was a draft then.
    """

    def __init__(
        self, cfg: DecoderConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.trunk = [BlockCache(1, batch, capacity, cfg, dtype, device) for _ in range(cfg.trunk_layers)]
        self.heads = BlockCache(head_blocks(cfg), batch, capacity, cfg, dtype, device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity
        self.tokens = self.first = self.redo_from = None
        if cfg.head_type == "sequential":
            # head k at the last position reads token capacity-1+k-1: id 0 there unless written
            self.tokens = torch.zeros(batch, capacity + cfg.mtp_heads, dtype=torch.long, device=device)
            self.first = torch.zeros(batch, capacity, cfg.hidden_size, dtype=dtype, device=device)
            self.redo_from = torch.zeros(batch, dtype=torch.long, device=device)


class MTPDecoder(torch.nn.Module):
    """Embedding, trunk, heads (with the shared final norm) and unembedding; weights from weights.py."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.trunk = torch.nn.ModuleList(StackedBlocks(cfg, 1) for _ in range(cfg.trunk_layers))
        self.heads = build_heads(cfg)
        self.unembed = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self._rope: Tensor | None = (
            None  # cos/sin tables, built on first use (after the weights' dtype/device)
        )

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.cfg, batch, capacity, self.embed.dtype, self.embed.device)

    def frame(self, positions: Tensor, capacity: int) -> Frame:
        """The :class:`Frame` of queries at positions [B, S] over a cache of ``capacity`` positions."""
        end = int(positions.max()) + 1  # once per forward, not per block (a device sync on GPUs)
        if end > capacity:
            raise ValueError(f"position {end - 1} is past the cache capacity {capacity}")
        if self._rope is None or self._rope.shape[1] < capacity:  # computed once per size, not per layer
            cfg = self.cfg
            self._rope = rope_tables(
                max(capacity, cfg.context), cfg.head_dim, cfg.rope_base, self.embed.dtype, self.embed.device
            )
        cos, sin = self._rope[:, positions, None]  # [B, S, 1, hd] each
        # a query at position p sees keys 0..p: every one is written by then (earlier steps or this one)
        visible = (torch.arange(end, device=positions.device) <= positions[..., None])[:, None]
        return Frame(positions, (cos, sin), visible)

    def step_heads(self, speculative: bool) -> int:
        """Heads a decoding forward returns: all of them where they draft from it (speculative), else head 1
        (plain decoding; sequential heads, which draft after it: :meth:`draft_logits`)."""
        return self.cfg.mtp_heads if speculative and self.cfg.head_type != "sequential" else 1

    @torch.no_grad()
    @compat.cuda_shims_paused()
    def hidden(self, tokens: Tensor, cache: KVCache, heads: int) -> Tensor:
        """Run tokens [B, S] at positions ``cache.lengths + 0..S-1`` through the trunk and the first
        ``heads`` heads, caching their keys/values (lengths are left to the caller: it decides what to
        keep). Returns the heads' normed hidden states [heads, B, S, d]. Sequential heads 2..``heads`` read
        the tokens past these from ``cache.tokens`` (id 0 where none was written)."""
        positions = cache.lengths[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        frame = self.frame(positions, cache.capacity)
        if cache.tokens is not None:
            cache.tokens[torch.arange(tokens.shape[0], device=tokens.device)[:, None], positions] = tokens
        x = F.embedding(tokens, self.embed)[None]
        for block, block_cache in zip(self.trunk, cache.trunk, strict=True):
            x = block(x, block_cache, frame, slice(0, 1))
        return self.heads(x[0], cache, frame, heads, self.embed)

    @compat.cuda_shims_paused()
    def logits(self, hidden: Tensor) -> Tensor:
        return torch.matmul(hidden, self.unembed.t())

    @torch.no_grad()
    @compat.cuda_shims_paused()
    def draft_logits(self, hidden: Tensor, at: Tensor, pending: Tensor, cache: KVCache) -> Tensor:
        """Logits [n-1, B, V] of heads 2..n standing at each row's last accepted position t (``at`` [B]: its
        index in ``hidden``, the last forward's output [heads, B, S, d]; ``cache.lengths`` = t + 1 already):
        their argmaxes are the drafts of tokens t+2..t+n after ``pending`` [B], head 1's choice of t+1."""
        if self.cfg.head_type != "sequential":
            return self.logits(hidden[1:, torch.arange(hidden.shape[1], device=at.device), at])
        return self._sequential_drafts(pending, cache)

    def _sequential_drafts(self, pending: Tensor, cache: KVCache) -> Tensor:
        """Heads 2..n one after another over a window of positions ending at each row's t. Head k's cache
        entry at p embeds token p+k-1: final when computed from a known token (p+k-1 <= t+1: accepted or
        pending), provisional when computed from a draft (p > t+2-k). So each step redoes every head from
        ``cache.redo_from`` = the previous step's t+3-n (head n's first provisional position) to the new t:
        (accepted + 1) + n-2 positions, on the tokens known now and the drafts made as it goes. Rows share
        one window width: a row with less to redo starts earlier (recomputing final entries alike), or, near
        the start of its sequence, runs past its t (stale entries, redone before anything reads them)."""
        n, rows = self.cfg.mtp_heads, torch.arange(pending.shape[0], device=pending.device)
        t = cache.lengths - 1
        cache.tokens[rows, t + 1] = pending
        width = int((t - cache.redo_from).max()) + 1
        start = (t - width + 1).clamp(min=0)
        positions = start[:, None] + torch.arange(width, device=t.device)
        first = cache.first[rows[:, None], positions]
        frame = self.frame(positions, cache.capacity)
        _, logits = self.heads.chain(first, cache, frame, n, self.embed, at=t - start, unembed=self.unembed)
        cache.redo_from = (t + 3 - n).clamp(min=0)
        return torch.stack(logits)

    @torch.no_grad()
    def forward(self, tokens: Tensor, heads: int | None = None, lookahead: Tensor | None = None) -> Tensor:
        """Logits [heads, B, S, V] of the first ``heads`` heads over whole sequences tokens [B, S] (no cache
        kept): head i at position t predicts token t+i. Sequential head k at t reads token t+k-1: past the
        end that is ``lookahead`` [B, <= n] (the tokens that follow, as a training batch holds them), id 0
        past those (as ``MTPModel.head_logits``)."""
        k = self.cfg.mtp_heads if heads is None else heads
        B, S = tokens.shape  # noqa: N806
        cache = self.new_cache(B, S)
        if lookahead is not None and cache.tokens is not None:
            after = lookahead[:, : self.cfg.mtp_heads]  # the buffer holds n positions past the end
            cache.tokens[:, S : S + after.shape[1]] = after
        return self.logits(self.hidden(tokens, cache, k))
