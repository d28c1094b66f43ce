"""What each head is asked to predict: shifted targets and their validity. torch only (no megatron), so
training, evaluation and inference share it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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
        return self.tokens[:, sl].t().contiguous(), self.valid_of_head(i, seq_len).t().contiguous()

    def valid_of_head(self, i: int, seq_len: int) -> Tensor:
        """[B, T] bool: which of head i's targets count (the loss's mask; batch-first)."""
        sl = slice(i + 1, i + 1 + seq_len)
        valid = self.valid[:, sl]
        if self.segments is not None:
            valid = valid & (self.segments[:, sl] == self.segments[:, :seq_len])
        return valid

    @classmethod
    def of_batch(cls, batch: Sequence[Tensor | None]) -> HeadTargets:
        """The targets of a model input ``(tokens[, target validity[, document numbers]])`` (engine/base.Batch),
        as MTPModel.forward builds them (no validity = every target valid)."""
        tokens, valid, segments = (*batch, None, None)[:3]
        return cls(tokens, torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid, segments)


def valid_counts(batches: Iterable[Sequence[Tensor | None]], seq_len: int) -> Tensor:
    """[n] int64: the valid targets of each head, summed over the micro-batches (n = the tokens' length -
    ``seq_len``), counted with the loss's own mask (:meth:`HeadTargets.valid_of_head`)."""
    total: Tensor | None = None
    for batch in batches:
        targets = HeadTargets.of_batch(batch)
        n = targets.tokens.shape[1] - seq_len
        counts = torch.stack([targets.valid_of_head(i, seq_len).sum() for i in range(n)])
        total = counts if total is None else total + counts
    if total is None:
        raise ValueError("valid_counts of no micro-batch")
    return total


@dataclass(frozen=True)
class StepCounts:
    """What the loss divides by under ``mtp.loss_normalization=global``: one denominator per head for the
    whole optimizer step, whatever its layout (the engine sets it per step, engine/base.step_normalization).

    The engines average the micro-batch losses into the gradient: megatron's schedule divides each by the
    number of micro-batches and its DDP averages over DP ranks; DeepSpeed divides by its gradient
    accumulation steps and averages over DP ranks. A micro-batch's head-i loss of ``w_i * averaged /
    counts[i] * (its CE sum)`` therefore adds up to ``w_i * (CE sum over the step) / counts[i]``.
    """

    counts: tuple[int, ...]  # head i's valid targets over the step: every micro-batch of every DP rank
    averaged: int  # the micro-batch losses the engine averages into one gradient: micro-batches x DP ranks

    def scales(self, weights: Sequence[float]) -> list[float]:
        """The factor of each head's CE sum in one micro-batch's loss: ``w_i * averaged / max(counts[i], 1)``."""
        if len(weights) != len(self.counts):
            raise ValueError(f"{len(weights)} loss weights for the step counts of {len(self.counts)} heads")
        return [w * self.averaged / max(c, 1) for w, c in zip(weights, self.counts, strict=True)]


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


def joint_hits(hits: Tensor) -> Tensor:
    """[n, ...] bool, row k-1 = "head k hit its (valid) target" -> row k-1 = "heads 1..k ALL hit theirs".

    Summed over positions, row k-1 is :attr:`HeadStats.joint` [k-1]: the teacher-forced count behind
    ``accept_k`` (see :meth:`HeadStats.acceptance`).
    """
    out = hits.clone()
    for k in range(1, out.shape[0]):  # n is small: n - 1 elementwise ANDs (a bool cummin is slower on CPU)
        out[k] &= out[k - 1]
    return out


@dataclass
class HeadStats:
    """Per-head sums over target positions; sums, so they add across micro-batches and data-parallel ranks."""

    loss_sum: Tensor  # [n] summed cross-entropy over valid targets (fp32 or wider)
    correct: Tensor  # [n] top-1 hits
    count: Tensor  # [n] valid targets
    # [n] positions where heads 1..k ALL hit their valid targets (k = 1..n; joint[0] == correct[0]): the
    # draft acceptance of self-speculative decoding, teacher-forced (see acceptance()). Zeros when not measured.
    joint: Tensor | None = None

    def __post_init__(self) -> None:
        if self.joint is None:
            self.joint = torch.zeros_like(self.correct)

    @property
    def n(self) -> int:
        return self.loss_sum.shape[0]

    def packed(self) -> Tensor:
        """[n, 4] (loss_sum, correct, count, joint) in the loss sum's dtype: one tensor to reduce across ranks."""
        dtype = self.loss_sum.dtype
        cols = [self.loss_sum, self.correct.to(dtype), self.count.to(dtype), self.joint.to(dtype)]
        return torch.stack(cols, dim=1)

    @classmethod
    def unpacked(cls, packed: Tensor) -> HeadStats:
        return cls(packed[:, 0], packed[:, 1], packed[:, 2], packed[:, 3])

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

    def acceptance(self) -> dict[str, float]:
        """``accept_k`` (k = 2..n) and ``tokens_per_forward``: self-speculative decoding's speed, teacher-forced.

        ``accept_k = joint[k-1] / count[k-1]``: the fraction of positions t where heads 1..k all predict their
        targets (greedy; head k's valid positions are valid for heads 1..k-1 too, as padding trails and
        documents are contiguous); ``accept_1`` is ``acc/head1`` and not repeated. Self-speculative decoding
        (inference/generate.py) standing at t emits head 1's token, which is by definition the model's own
        greedy choice, and accepts head j's draft of token t+j iff the drafts of heads 2..j all equal the
        greedy continuation. On the model's own greedy continuation (accept_1 = 1), "heads 1..k all hit" at t
        is therefore exactly "drafts 2..k accepted", and a forward at t gains A(t) + 1 = sum_k C_k(t) tokens,
        C_k(t) = 1[heads 1..k hit at t] (tests/unit/test_acceptance.py). On held-out text the positions where
        head 1 misses are not on the model's own path, so the estimate conditions on head 1's hit:

            P(drafts 2..k accepted) ~ accept_k / accept_1
            tokens_per_forward = 1 + sum_{k=2..n} accept_k / accept_1     (= E[A] + 1, A's tail sum)

        It estimates the mean tokens per *drafting* forward of greedy self-speculative decoding that always
        drafts (``min_tokens_per_forward=0``; in DecodeStats ``(proposed[0] + sum(accepted)) / proposed[0]``,
        whose ``tokens_per_forward`` also counts the prompt's forward, which gains 1), under two
        approximations: head k is judged against the text's token t+k, not the model's greedy token (they
        differ after a head-1 miss inside t+1..t+k-1), and every position weighs alike, while the decoder
        stands only where its accepted runs end. {} for n = 1.
        """
        if self.n < 2:
            return {}
        rate = (self.joint.double() / self.count.double().clamp(min=1)).tolist()
        out = {f"accept_{k}": rate[k - 1] for k in range(2, self.n + 1)}
        # no head-1 hit at all: nothing to condition on, and no draft could be confirmed
        out["tokens_per_forward"] = 1.0 + (sum(rate[1:]) / rate[0] if rate[0] > 0 else 0.0)
        return out


def with_targets(
    tokens: Iterable[Tensor], eos: int, pad: int, mask_doc_boundaries: bool
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Packed batches [B, T+n] -> the model's inputs (tokens, target validity, document numbers)."""
    for t in tokens:
        yield (t, *target_mask(t, eos, pad, mask_doc_boundaries))
