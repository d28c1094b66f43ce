"""Multi-token-prediction loss on the last pipeline stage, memory-efficient as in Gloeckle et al. 2024 §2.

Naive MTP keeps all n heads' [T, B, V] logits alive until the backward: O(nV) activation memory. Here the
trunk output h is detached, and each head in turn runs forward + backward to the detached copy, so only
one head's logits (or one sequence chunk of them, with `chunk_size`) is ever alive: O(V + d).

All of that happens inside the *forward* of one autograd Function, which returns the summed loss and whose
backward hands the accumulated gradient to h and to every head parameter. The model therefore returns one
scalar loss like any other, and everything outside — the pipeline schedule, grad accumulation scaling,
megatron DDP's grad-ready hooks, DeepSpeed ZeRO's — sees each parameter receive its gradient exactly once.
(Calling backward once per head instead fires those hooks n times for the shared unembedding: wrong
gradients under ZeRO and overlapped DDP reduction, measured; see docs/architecture.md §6.) The inner backwards use
`torch.autograd.grad`, which returns gradients instead of accumulating into `.grad`, so no hook fires early.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import Tensor

from mtp_pretrain.config import MTPConfig
from mtp_pretrain.model.heads import HeadInputs, MTPHeads
from mtp_pretrain.model.vocab import mask_vocab_padding, vocab_parallel_argmax
from mtp_pretrain.rng import RandomState
from mtp_pretrain.targets import HeadStats, HeadTargets, StepCounts, joint_hits


def _chunk_ce(
    logits: Tensor, target: Tensor, valid: Tensor, vocab_limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """Summed CE over valid positions (differentiable) and the top-1 hits [t, B] (bool; False where invalid)."""
    # CE in fp32 under bf16 training, as megatron does (fp16_lm_cross_entropy=False)
    logits = mask_vocab_padding(logits.float(), vocab_limit)
    hits = (vocab_parallel_argmax(logits.detach()) == target) & valid
    # megatron's vocab-parallel CE even at TP=1: it works in place on the logits, so the chunk's softmax
    # costs no second V-sized buffer (torch's fused CE saves its own log-softmax: measured 3% faster
    # step on the CPU demo, but one more logits-sized tensor at the peak this loss exists to keep low).
    # It overwrites its input; the logits are not needed afterwards.
    ce = vocab_parallel_cross_entropy(logits, torch.where(valid, target, 0))
    return (ce * valid).sum(), hits


def _chunks(seq_len: int, chunk_size: int) -> list[slice]:
    step = chunk_size if chunk_size > 0 else seq_len
    return [slice(s, min(s + step, seq_len)) for s in range(0, seq_len, step)]


class _DetachedHeadsLoss(torch.autograd.Function):
    """forward: all heads' forward+backward on detached h; backward: hand the saved gradients on."""

    @staticmethod
    def forward(ctx, h: Tensor, compute: Callable, *params: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        with torch.enable_grad():
            loss, stats, grad_h, grad_params = compute(h, params)
        ctx.save_for_backward(grad_h, *grad_params)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor):  # type: ignore[override]
        # Scaled in place: the saved gradients are this Function's own and used once, and a copy would put
        # a second unembedding-sized (V x d) gradient and one per head layer at the backward's peak.
        grad_h, *grad_params = ctx.saved_tensors
        scaled = [None if g is None else g.mul_(grad_loss) for g in grad_params]
        return (grad_h.mul_(grad_loss), None, *scaled)


@dataclass
class MTPLoss:
    """The loss of the heads, as the model's last stage calls it (``loss_fn`` of MTPModel): the MTP settings
    bound, the model's tensors passed in. Returns (weighted total loss, per-head statistics).

    Normalization (``mtp.loss_normalization``): ``global`` divides head i's CE sum by its valid targets over
    the whole optimizer step, ``step_counts``, which the engine sets for the duration of each step
    (engine/base.step_normalization); a call outside an engine step (``step_counts`` None) is its own step.
    ``micro_batch`` divides by the micro-batch's own count (the engines then average the micro-batches and
    DP ranks: the gradient depends on how the valid targets fall into micro-batches).
    """

    weights: Sequence[float]  # per head (MTPConfig.weights()); the trainer sets each step's (weight_schedule)
    chunk_size: int = 0
    memory_efficient: bool = True
    vocab_limit: int | None = None  # ids >= this are vocabulary padding: never predicted
    normalization: str = "global"  # or "micro_batch" (MTPConfig.loss_normalization)
    chain_recompute: bool = True  # chained heads: re-run forwards in the backward (MTPConfig.chain_recompute)
    # this optimizer step's per-head denominators under "global"; set and cleared by the engine
    step_counts: StepCounts | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.normalization not in ("global", "micro_batch"):
            raise ValueError(f"normalization={self.normalization!r}: use global or micro_batch")

    @classmethod
    def from_config(cls, mtp: MTPConfig, vocab_limit: int | None = None) -> MTPLoss:
        return cls(
            tuple(mtp.weights()),
            mtp.chunk_size,
            mtp.memory_efficient,
            vocab_limit,
            mtp.loss_normalization,
            mtp.chain_recompute,
        )

    def _scales(self, per_head: Sequence[tuple[Tensor, Tensor]]) -> list[float]:
        """The factor of each head's CE sum in this call's loss (a constant of the graph, like a weight)."""
        if self.normalization == "global" and self.step_counts is not None:
            return self.step_counts.scales(self.weights)
        # the mean over this call's own valid targets: "micro_batch", or a call that is the whole step
        return [w / max(int(v.sum()), 1) for w, (_, v) in zip(self.weights, per_head, strict=True)]

    def __call__(
        self,
        h: Tensor,
        heads: MTPHeads,
        unembed: Callable[[Tensor], Tensor],
        unembed_weight: torch.nn.Parameter,
        targets: HeadTargets,
        inputs: HeadInputs,
    ) -> tuple[Tensor, HeadStats]:
        """Loss = sum_i w_i * mean CE of head i over its valid targets (those of the optimizer step, or of this
        micro-batch: see the class), and the per-head statistics (with the joint hits of heads 1..k behind
        the validation's draft acceptance, HeadStats.acceptance).

        h: trunk output [T, B, d]. `unembed` maps [t, B, d] -> vocab-parallel logits [t, B, V/tp] with
        `unembed_weight`. chunk_size > 0 computes the unembedding + CE in sequence chunks of that length.
        """
        chunk_size, vocab_limit = self.chunk_size, self.vocab_limit
        seq_len, n = h.shape[0], heads.n
        per_head = [targets.of_head(i, seq_len) for i in range(n)]
        scales = self._scales(per_head)

        def head_loss(i: int, y: Tensor, w_grad: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
            """Head i's output y, one sequence chunk of logits at a time: (CE sum, top-1 hits [T, B], dL/dy).

            With w_grad (the training path) it also backpropagates head i's scaled loss through the shared
            unembedding by hand: dW += dlogits^T y goes into w_grad in place (addmm_), so the V x d gradient
            exists once however many heads and chunks add to it (autograd would hand back a fresh V x d
            tensor per call), and dy = dlogits W, all-reduced across TP like ColumnParallelLinear's input.
            """
            tgt, valid = per_head[i]
            y_det = y.detach()
            chunks = _chunks(seq_len, chunk_size)
            # dL/dy: one chunk writes it whole; several fill their slices of one buffer
            dy = torch.empty_like(y_det) if w_grad is not None and len(chunks) > 1 else None
            loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            # [T, B] bool: T*B bytes, nothing next to one chunk's [t, B, V] logits
            hits = torch.empty(valid.shape, dtype=torch.bool, device=h.device)
            for sl in chunks:
                if w_grad is None:
                    ce_sum, hits[sl] = _chunk_ce(unembed(y_det[sl]), tgt[sl], valid[sl], vocab_limit)
                else:
                    y_c = y_det[sl]
                    with torch.no_grad():
                        logits = F.linear(y_c, unembed_weight)
                    logits.requires_grad_()
                    with torch.enable_grad():
                        ce_sum, hits[sl] = _chunk_ce(logits, tgt[sl], valid[sl], vocab_limit)
                        (g_logits,) = torch.autograd.grad(ce_sum * scales[i], logits)
                    with torch.no_grad():  # with a graph, dy would keep every chunk's g_logits alive
                        g2 = g_logits.flatten(0, 1)
                        w_grad.addmm_(g2.t(), y_c.flatten(0, 1))
                        dy_c = (g2 @ unembed_weight).view_as(y_c)
                        if dy is None:
                            dy = dy_c
                        else:
                            dy[sl] = dy_c
                    # the CE graph reaches the logits leaf through its AccumulateGrad node: drop it now
                    ce_sum = ce_sum.detach()
                    del logits, g_logits, g2
                loss_sum = loss_sum + ce_sum.detach().float()
            if dy is not None and parallel_state.get_tensor_model_parallel_world_size() > 1:
                torch.distributed.all_reduce(dy, group=parallel_state.get_tensor_model_parallel_group())
            return loss_sum, hits, dy

        def stats_of(rows: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
            """[n, 4] HeadStats.packed() of the rows {i: (CE sum, hits [T, B])} of heads 1..n."""
            counts = [v.sum() for _, v in per_head]
            ordered = [rows[i] for i in range(n)]
            joint = joint_hits(torch.stack([hit for _, hit in ordered]))  # [n, T, B] bool
            # whole-tensor sums: a bool sum over some dims takes a slow path on CPU (~1 ms here, 50x)
            return torch.stack(
                [
                    torch.stack([s, hit.sum().float(), k.float(), j.sum().float()])
                    for (s, hit), k, j in zip(ordered, counts, joint, strict=True)
                ]
            )

        def total_loss(rows: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
            return sum(rows[i][0] * scales[i] for i in range(n))

        if not torch.is_grad_enabled():  # evaluation: no graph, one head's logits chunk alive at a time
            rows = {i: head_loss(i, y, w_grad=None)[:2] for i, y in heads.run(h, inputs)}
            return total_loss(rows), HeadStats.unpacked(stats_of(rows))

        if not self.memory_efficient:  # the reference: every head's logits stay alive in one graph
            rows, terms = {}, []
            for i, y in heads.run(h, inputs):
                tgt, valid = per_head[i]
                ce_sum, hits = _chunk_ce(unembed(y), tgt, valid, vocab_limit)
                terms.append(ce_sum * scales[i])
                rows[i] = (ce_sum.detach().float(), hits)
            return sum(terms), HeadStats.unpacked(stats_of(rows))

        params = list(
            {id(p): p for i in range(n) for p in [unembed_weight, *heads.head_parameters(i, inputs)]}.values()
        )

        def compute(h_in: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, list]:
            z = h_in.detach().requires_grad_()
            slot = {id(p): k for k, p in enumerate(params)}
            grads: list[Tensor | None] = [None] * len(params)
            grads[slot[id(unembed_weight)]] = w_grad = torch.zeros_like(unembed_weight)
            grad_z = torch.zeros_like(z)

            def backward_head(i: int, outputs: list[Tensor], grad_outputs: list[Tensor], x: Tensor) -> Tensor:
                """Head i's gradient into its parameters' slots; returns the gradient of its input x."""
                own = heads.head_parameters(i, inputs)
                g = torch.autograd.grad(outputs, [x, *own], grad_outputs=grad_outputs, allow_unused=True)
                for p, gp in zip(own, g[1:], strict=True):
                    k = slot[id(p)]
                    if gp is not None:
                        grads[k] = gp if grads[k] is None else grads[k].add_(gp)  # in place: no 2nd copy
                return g[0]

            rows: dict[int, tuple[Tensor, Tensor]] = {}
            if not heads.chained:  # every head reads h: forward and backward one head at a time
                for i in heads.order:
                    y, _ = heads.forward_head(i, z, inputs)
                    loss_sum, hits, dy = head_loss(i, y, w_grad)
                    rows[i] = (loss_sum, hits)
                    grad_z += backward_head(i, [y], [dy], z)
                    del y, dy
            else:
                grad_z += self._chained_backward(heads, inputs, z, head_loss, w_grad, rows, backward_head)
            return total_loss(rows).detach(), stats_of(rows), grad_z, grads

        loss, stats = _DetachedHeadsLoss.apply(h, compute, *params)  # a Function returns tensors only
        return loss, HeadStats.unpacked(stats)

    def _chained_backward(
        self,
        heads: MTPHeads,
        inputs: HeadInputs,
        z: Tensor,
        head_loss: Callable,
        w_grad: Tensor,
        rows: dict[int, tuple[Tensor, Tensor]],
        backward_head: Callable,
    ) -> Tensor:
        """Heads that read each other: forward them in chain order keeping only d-sized tensors (each head's
        carry and dL/dy; its logits are made, used and dropped as for parallel heads), then backward head by
        head in reverse, re-running each head's forward (with the random state it had: dropout) and carrying
        the gradient down the chain. Peak: one head's activations or one chunk of logits, never both (the
        parallel heads' is their sum). ``chain_recompute=False`` keeps every head's graph instead of re-running
        it (n heads' activations, no second forward). Returns dL/dz."""
        carries: dict[int, Tensor] = {}
        dys: dict[int, Tensor] = {}
        rng: dict[int, RandomState] = {}
        kept: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # head -> (its input leaf, y, carry) with graph
        for i in heads.order:
            src = heads.source(i)
            x = z if src is None else carries[src].detach()
            if not self.chain_recompute:
                x = x if src is None else x.requires_grad_()
                with torch.enable_grad():
                    y, carry = heads.forward_head(i, x, inputs)
                kept[i] = (x, y, carry)
            else:
                rng[i] = RandomState.capture()
                with torch.no_grad():
                    y, carry = heads.forward_head(i, x, inputs)
            carries[i] = carry.detach()
            loss_sum, hits, dys[i] = head_loss(i, y, w_grad)
            rows[i] = (loss_sum, hits)
            del y, carry, x
        grad_carry: dict[int, Tensor] = {}
        grad_z = torch.zeros_like(z)
        for i in reversed(heads.order):
            src = heads.source(i)
            if i in kept:
                x, y, carry = kept.pop(i)
            else:
                x = z if src is None else carries[src].requires_grad_()
                with rng[i].replayed():
                    y, carry = heads.forward_head(i, x, inputs)
            g_carry = grad_carry.pop(i, None)
            if g_carry is None:
                outputs, grad_outputs = [y], [dys.pop(i)]
            elif carry is y:  # sequential: the next head reads y itself
                outputs, grad_outputs = [y], [dys.pop(i) + g_carry]
            else:
                outputs, grad_outputs = [y, carry], [dys.pop(i), g_carry]
            g_x = backward_head(i, outputs, grad_outputs, x)
            if src is None:
                grad_z += g_x
            else:
                grad_carry[src] = g_x if src not in grad_carry else grad_carry[src] + g_x
            del y, carry, outputs, grad_outputs, x, g_x
        return grad_z


def mtp_losses(models: Iterable[torch.nn.Module]) -> list[MTPLoss]:
    """The MTPLoss of every model chunk in ``models`` (build.py binds one as ``loss_fn`` to each last-stage
    chunk; other stages have none): what the engine normalizes and mtp.weight_schedule re-weights."""
    found = {
        id(fn): fn
        for root in models
        for m in root.modules()
        if isinstance(fn := getattr(m, "loss_fn", None), MTPLoss)
    }
    return list(found.values())
