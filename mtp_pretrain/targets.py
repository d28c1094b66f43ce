"""What each head is asked to predict: shifted targets and their validity. torch only (no megatron), so
training, evaluation and inference share it."""

from __future__ import annotations

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


def target_mask(tokens: torch.Tensor, eos: int, pad: int, mask_doc_boundaries: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
