"""What each head is asked to predict: shifted targets and their validity. torch only (no megatron), so
training, evaluation and inference share it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class HeadTargets:
    """Targets of every head: head i (0-based) predicts tokens[:, i+1 : i+1+T]."""

    tokens: Tensor  # [B, T+n] int64
    valid: Tensor  # [B, T+n] bool; False = padding / masked target
    # [B, T+n] document number of each token, or None: head i's target at position t counts only when it
    # lies in the same document as the input token t (document-boundary masking)
    segments: Tensor | None = None

    def of_head(self, i: int, seq_len: int) -> tuple[Tensor, Tensor]:
        """[T, B] targets and validity of head i, in megatron's sequence-first layout."""
        sl = slice(i + 1, i + 1 + seq_len)
        valid = self.valid[:, sl]
        if self.segments is not None:
            valid = valid & (self.segments[:, sl] == self.segments[:, :seq_len])
        return self.tokens[:, sl].t().contiguous(), valid.t().contiguous()


def target_mask(
    tokens: torch.Tensor, eos: int, pad: int, mask_doc_boundaries: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid, segments)`` for packed ``tokens`` [B, L]: ``valid`` is False on padding; ``segments`` numbers
    the documents of each row (a document's EOS belongs to it) when ``mask_doc_boundaries``, else zeros.

    The loss then drops head i's target at position t when it lies in another document than the input
    token (see :class:`HeadTargets`).
    """
    valid = tokens != pad
    if not mask_doc_boundaries:
        return valid, torch.zeros_like(tokens, dtype=torch.int32)
    is_eos = (tokens == eos).to(torch.int32)
    return valid, (torch.cumsum(is_eos, dim=1, dtype=torch.int32) - is_eos)


@dataclass
class HeadStats:
    """Per-head sums over target positions; sums, so they add across micro-batches and data-parallel ranks."""

    loss_sum: Tensor  # [n] summed cross-entropy over valid targets (fp32 or wider)
    correct: Tensor  # [n] top-1 hits
    count: Tensor  # [n] valid targets

    @property
    def n(self) -> int:
        return self.loss_sum.shape[0]

    def packed(self) -> Tensor:
        """[n, 3] (loss_sum, correct, count) in the loss sum's dtype: one tensor to reduce across ranks."""
        dtype = self.loss_sum.dtype
        return torch.stack([self.loss_sum, self.correct.to(dtype), self.count.to(dtype)], dim=1)

    @classmethod
    def unpacked(cls, packed: Tensor) -> HeadStats:
        return cls(packed[:, 0], packed[:, 1], packed[:, 2])

    @classmethod
    def total(cls, parts: list[HeadStats]) -> HeadStats:
        return cls.unpacked(torch.stack([p.packed() for p in parts]).sum(0))

    def metrics(self) -> dict[str, float]:
        """``loss/head{k}`` (mean CE over valid targets) and ``acc/head{k}`` (top-1), k = 1..n."""
        count = self.count.double().clamp(min=1)
        loss, acc = (self.loss_sum.double() / count).tolist(), (self.correct.double() / count).tolist()
        out: dict[str, float] = {}
        for k, (lo, ac) in enumerate(zip(loss, acc, strict=True), start=1):
            out[f"loss/head{k}"], out[f"acc/head{k}"] = lo, ac
        return out


def with_targets(
    tokens: Iterable[Tensor], eos: int, pad: int, mask_doc_boundaries: bool
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Packed batches [B, T+n] -> the model's inputs (tokens, target validity, document numbers)."""
    for t in tokens:
        yield (t, *target_mask(t, eos, pad, mask_doc_boundaries))
