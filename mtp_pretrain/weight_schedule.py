"""The heads' loss weights over training (``mtp.weight_schedule``): a pure function of the training progress.

``progress`` p = step / trainer.steps, where ``step`` is the number of optimizer steps already run (0 for the
first). Every step consumes the same number of tokens, so p is also the fraction of the training tokens consumed
before the step. The trainer restores ``step`` on resume, so a resumed run gets exactly the weights of the
uninterrupted one. Head 1 (next token) always keeps its constant weight w_1; ``base`` = MTPConfig.weights()
= [w_1, ..., w_n] (``mtp.loss_weights``, or [1, w, ..., w] with w = ``mtp.extra_heads_weight``).

Rules, for heads k = 2..n:

- ``constant``: w_k throughout (the behaviour before schedules; bit-identical to it).
- ``step`` (DeepSeek-V3, arXiv 2412.19437 §4.2: the MTP loss weight lambda is 0.3 for the first 10T tokens and
  0.1 for the remaining 4.8T): ``weight_start`` while p < ``weight_switch_at``, then ``weight_end``
  (defaults 0.3, 0.1, 0.676 = 10 / 14.8). DeepSeek-V3 has one MTP module (D = 1), whose weight is lambda;
  megatron divides lambda by the depth D (``mtp_loss_scaling_factor / mtp_num_layers``), here every extra head
  gets the value: give weight_start / (n-1) and weight_end / (n-1) for megatron's scaling.
- ``linear``: ``weight_start + (weight_end - weight_start) * p`` (a ramp over the whole training).
- ``forward`` (Aynetdinov & Akbik, ACL 2025, forward curriculum: from next-token prediction to MTP): the first
  f = ``curriculum_fraction`` of training is cut into n equal stages; head k is switched on (weight w_k, else 0)
  from p >= f (k-1) / n. Stage j (j = 0..n-1) trains heads 1..j+1; from p = f (n-1) / n on, all n heads.
- ``reverse`` (their reverse curriculum: from MTP to next-token prediction): head k is switched off (weight 0)
  from p >= f (n-k+1) / n: head n first, at f / n; stage j trains heads 1..n-j; from f (n-1) / n on, head 1 only.

The paper grows / shrinks the number of heads in equal stages over training; with f = 1 (the default) the
stages are 1/n of training each, as there. f < 1 puts all the switching into the first f of training.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mtp_pretrain.config import MTPConfig


def progress(step: int, total_steps: int) -> float:
    """The fraction of training done before optimizer step ``step`` (0-based) of ``total_steps``: in [0, 1]."""
    return min(max(step / max(total_steps, 1), 0.0), 1.0)


def head_weights(mtp: MTPConfig, p: float) -> list[float]:
    """The loss weight of every head (k = 1..n) at training progress ``p`` (see the module for each rule)."""
    base, n, kind = mtp.weights(), mtp.n, mtp.weight_schedule
    if kind == "constant":
        return base
    if kind == "step":
        extra = mtp.weight_start if p < mtp.weight_switch_at else mtp.weight_end
        return [base[0]] + [extra] * (n - 1)
    if kind == "linear":
        extra = mtp.weight_start + (mtp.weight_end - mtp.weight_start) * p
        return [base[0]] + [extra] * (n - 1)
    f = mtp.curriculum_fraction
    if kind == "forward":  # head k (index i = k-1) on from p >= f (k-1) / n
        return [w if i == 0 or p >= f * i / n else 0.0 for i, w in enumerate(base)]
    if kind == "reverse":  # head k off from p >= f (n-k+1) / n
        return [w if i == 0 or p < f * (n - i) / n else 0.0 for i, w in enumerate(base)]
    raise ValueError(f"mtp.weight_schedule={kind!r}: use constant, step, linear, forward or reverse")


def set_weights(losses: Iterable, weights: Sequence[float]) -> None:
    """Set ``weights`` on every MTPLoss of this rank: they feed the step's loss scales (MTPLoss._scales, under
    both normalizations) at the next forward, so training and the validation after the step use them."""
    for loss in losses:
        loss.weights = tuple(weights)


def metrics(weights: Sequence[float]) -> dict[str, float]:
    """``mtp_weight_k`` (k = 1..n): the weights of the step, as the train metrics log them."""
    return {f"mtp_weight_{k}": float(w) for k, w in enumerate(weights, start=1)}
