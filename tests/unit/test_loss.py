"""The memory-efficient MTP loss gives the naive loss's value and exactly its gradients; its normalization by
the optimizer step's valid targets (mtp.loss_normalization)."""

from dataclasses import replace

import pytest
import torch

from mtp_pretrain.build import build_model
from mtp_pretrain.config import ModelConfig, MTPConfig
from mtp_pretrain.loss import MTPLoss
from mtp_pretrain.model.heads import HeadInputs
from mtp_pretrain.model.mtp_model import transformer_config
from mtp_pretrain.rng import RandomState
from mtp_pretrain.targets import StepCounts, target_mask, valid_counts
from tests.builders import VOCAB, random_batch
from tests.numerics import EPS32, assert_same_gradient


def _models(
    cfg: ModelConfig,
    n: int,
    chunk: int,
    tie: bool = False,
    head_type: str = "parallel",
    recompute: bool = True,
):
    torch.manual_seed(0)
    cfg = replace(cfg, tie_embeddings=tie)
    mtp_naive = MTPConfig(
        n=n, memory_efficient=False, loss_weights=[1.0 + 0.5 * i for i in range(n)], head_type=head_type
    )
    mtp_eff = replace(mtp_naive, memory_efficient=True, chunk_size=chunk, chain_recompute=recompute)
    naive = build_model(cfg, mtp_naive, VOCAB, transformer_config(cfg, mtp_naive))
    eff = build_model(cfg, mtp_eff, VOCAB, transformer_config(cfg, mtp_eff))
    eff.load_state_dict(naive.state_dict())
    return naive, eff


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("padded", [False, True])
def test_memory_efficient_gradients_equal_naive(dist_world, tiny_model_cfg, n, chunk, padded):
    naive, eff = _models(tiny_model_cfg, n, chunk)
    tokens, valid = random_batch(tiny_model_cfg, n, padded)
    loss_n, stats_n = naive(tokens, valid)
    loss_e, stats_e = eff(tokens, valid)
    (2.5 * loss_n).backward()  # an outer scale (grad accumulation, loss scaling) must reach every gradient
    (2.5 * loss_e).backward()
    # the same fp32 CE sums in both paths (chunking reorders the sum over <= 72 positions per head): a few
    # ulps of the loss (measured <= 1); 16 as in tests/unit/engine/test_megatron.py
    torch.testing.assert_close(loss_e, loss_n, rtol=16 * EPS32, atol=0)
    # per-head (CE sum over <= 72 positions, hits, count): hits and counts exact, sums measured <= 2.2 ulps
    torch.testing.assert_close(stats_e.packed(), stats_n.packed(), rtol=16 * EPS32, atol=0)
    grads_n = dict(naive.named_parameters())
    checked = 0
    for name, p in eff.named_parameters():
        ref = grads_n[name].grad
        assert (p.grad is None) == (ref is None), name
        if ref is not None:
            assert_same_gradient(p.grad, ref, name)
            checked += 1
    assert checked == len(list(eff.parameters()))


@pytest.mark.parametrize(
    ("head_type", "tie", "recompute"),
    [(t, tie, True) for t in ("linear", "causal", "anticausal", "sequential") for tie in (False, True)]
    + [(t, False, False) for t in ("causal", "anticausal", "sequential")],
)
def test_every_head_type_gives_the_naive_gradients(dist_world, tiny_model_cfg, head_type, tie, recompute):
    """The chained heads' forward-then-reverse backward (re-running their forwards, or keeping their graphs:
    mtp.chain_recompute) and the linear heads' equal autograd on the naive loss; every parameter gets a
    gradient (sequential heads: the word embedding too)."""
    naive, eff = _models(tiny_model_cfg, 4, 7, tie=tie, head_type=head_type, recompute=recompute)
    tokens, valid = random_batch(tiny_model_cfg, 4, True)
    loss_n, stats_n = naive(tokens, valid)
    loss_e, stats_e = eff(tokens, valid)
    (2.5 * loss_n).backward()
    (2.5 * loss_e).backward()
    # the bounds of test_memory_efficient_gradients_equal_naive: the same sums, the heads run in the same
    # order; the chained heads' re-run forward computes the same fp32 values
    torch.testing.assert_close(loss_e, loss_n, rtol=16 * EPS32, atol=0)
    torch.testing.assert_close(stats_e.packed(), stats_n.packed(), rtol=16 * EPS32, atol=0)
    grads_n = dict(naive.named_parameters())
    for name, p in eff.named_parameters():
        assert p.grad is not None and grads_n[name].grad is not None, name
        assert_same_gradient(p.grad, grads_n[name].grad, f"{head_type} {name}")
    with torch.no_grad():  # the evaluation path runs the same chain
        loss_eval, stats_eval = eff(tokens, valid)
    torch.testing.assert_close(loss_eval, loss_e.detach())
    torch.testing.assert_close(stats_eval.packed(), stats_e.packed())


def test_tied_embeddings_gradients_equal_naive(dist_world, tiny_model_cfg):
    naive, eff = _models(tiny_model_cfg, 3, 5, tie=True)
    assert not hasattr(eff.output_layer, "weight") or eff.output_layer.weight is None
    tokens, valid = random_batch(tiny_model_cfg, 3, True)
    naive(tokens, valid)[0].backward()
    eff(tokens, valid)[0].backward()
    for (name, p), q in zip(eff.named_parameters(), naive.parameters(), strict=True):
        assert_same_gradient(p.grad, q.grad, name)


def test_eval_path_matches_training_value_and_keeps_no_graph(dist_world, tiny_model_cfg):
    _, eff = _models(tiny_model_cfg, 4, 5)
    tokens, valid = random_batch(tiny_model_cfg, 4, True)
    loss_train, stats_train = eff(tokens, valid)
    with torch.no_grad():
        loss_eval, stats_eval = eff(tokens, valid)
    assert not loss_eval.requires_grad
    # the eval path sums the same CE values without the autograd Function: measured equal; the default fp32
    # tolerance (1.3e-6 relative, ~11 ulps) allows another summation order
    torch.testing.assert_close(loss_eval, loss_train.detach())
    torch.testing.assert_close(stats_eval.packed(), stats_train.packed())


def test_stats_count_valid_targets_and_accuracy(dist_world, tiny_model_cfg):
    _, eff = _models(tiny_model_cfg, 2, 0)
    tokens, valid = random_batch(tiny_model_cfg, 2, True)
    _, stats = eff(tokens, valid)
    T = tiny_model_cfg.seq_len
    for i in range(2):
        assert stats.count[i] == valid[:, i + 1 : i + 1 + T].sum()
        assert 0 <= stats.correct[i] <= stats.count[i]
    # an untrained model (init std 0.02) is near uniform: mean CE within 0.5 of ln(V) (measured 0.04)
    mean_ce = stats.loss_sum / stats.count
    assert torch.all((mean_ce - torch.log(torch.tensor(float(VOCAB)))).abs() < 0.5)


def test_loss_weights_scale_each_head(dist_world, tiny_model_cfg):
    _, eff = _models(tiny_model_cfg, 2, 0)
    tokens, valid = random_batch(tiny_model_cfg, 2, False)
    loss, stats = eff(tokens, valid)
    means = stats.loss_sum / stats.count
    # the same per-head sums, divided and weighted here in another order: an ulp or two of the loss (measured
    # 0.6); the default fp32 tolerance (1.3e-6 relative, ~11 ulps)
    torch.testing.assert_close(loss.detach(), 1.0 * means[0] + 1.5 * means[1])


def test_document_boundary_mask_drops_cross_document_targets(dist_world, tiny_model_cfg):
    """segments: head i's target at t counts iff it is in the input token's document; both loss paths agree."""
    n = 3
    naive, eff = _models(tiny_model_cfg, n, 0)
    tokens, valid = random_batch(tiny_model_cfg, n, padded=True)
    eos = tokens[0, 5].item()
    tokens[:, [5, 11, 12]] = eos  # documents end at 5, 11 and 12 (a one-token document)
    _, segments = target_mask(tokens, eos, pad=-1, mask_doc_boundaries=True)
    loss_n, stats_n = naive(tokens, valid, segments)
    loss_e, stats_e = eff(tokens, valid, segments)
    loss_n.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_e, loss_n, rtol=16 * EPS32, atol=0)  # as in the first test
    T = tiny_model_cfg.seq_len
    for i in range(n):  # expected counts, position by position
        same_doc = [
            [
                bool(valid[b, t + i + 1]) and int(segments[b, t]) == int(segments[b, t + i + 1])
                for t in range(T)
            ]
            for b in range(tokens.shape[0])
        ]
        assert stats_e.count[i].item() == stats_n.count[i].item() == sum(map(sum, same_doc))
    assert stats_e.count[n - 1] < valid[:, n:].sum()  # the mask removed targets
    for (name, p), q in zip(eff.named_parameters(), naive.parameters(), strict=True):
        assert_same_gradient(p.grad, q.grad, name)


def test_padding_ids_of_the_padded_vocabulary_get_no_probability(dist_world, tiny_model_cfg):
    """vocab 200 is padded to 256 (a multiple of 128 x TP): the loss is CE over the 200 real ids only."""
    mtp = MTPConfig(n=2)
    model = build_model(tiny_model_cfg, mtp, 200, transformer_config(tiny_model_cfg, mtp))
    assert model.vocab_size == 256 and model.output_layer.weight.shape[0] == 256
    tokens, valid = random_batch(tiny_model_cfg, 2, padded=False)
    tokens = tokens % 200
    loss, stats = model(tokens, valid)
    logits = model.head_logits(tokens[:, : tiny_model_cfg.seq_len])
    assert all(torch.isinf(lg[..., 200:]).all() for lg in logits)  # what generation sees, too
    with torch.no_grad():
        h, rotary = model.trunk(tokens[:, : tiny_model_cfg.seq_len], tiny_model_cfg.seq_len)
        want = 0.0
        for i in range(2):
            full = model.unembed(model.heads.forward_head(i, h, HeadInputs(rotary))[0])[
                ..., :200
            ]  # [T, B, 200]
            target = tokens[:, i + 1 : i + 1 + tiny_model_cfg.seq_len].t()
            want += torch.nn.functional.cross_entropy(full.flatten(0, 1), target.flatten())
    # CE over 256 ids of which 56 are -inf (exact zeros in the sum) vs over the 200 real ones: another
    # summation order of the same terms, a few ulps of the loss (measured equal)
    torch.testing.assert_close(loss, want, rtol=16 * EPS32, atol=0)
    loss.backward()
    assert model.output_layer.weight.grad[200:].abs().max() == 0  # padding rows learn nothing


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("normalization", ["global", "micro_batch"])
def test_step_normalization_splits_a_batch_into_micro_batches(
    dist_world, tiny_model_cfg, efficient, normalization
):
    """Under "global" with the step's counts set (as the engines set them), the two halves' losses, averaged as
    the engines average micro-batches, give the whole batch's loss and gradients, on both loss paths;
    "micro_batch" ignores the step's counts (each half its own mean: another gradient)."""
    naive, eff = _models(tiny_model_cfg, 3, 0)
    model, T = (eff if efficient else naive), tiny_model_cfg.seq_len
    model.loss_fn.normalization = normalization
    tokens, valid = random_batch(tiny_model_cfg, 3, padded=True, batch=4)
    valid[2:, 6:] = False  # the second half holds far fewer valid targets than the first
    loss_whole, _ = model(tokens, valid)
    loss_whole.backward()
    whole = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    halves = [(tokens[:2], valid[:2]), (tokens[2:], valid[2:])]
    model.loss_fn.step_counts = StepCounts(tuple(valid_counts(halves, T).tolist()), averaged=2)
    loss_split = sum(model(*half)[0] / 2 for half in halves)
    loss_split.backward()
    model.loss_fn.step_counts = None
    if normalization == "micro_batch":  # the halves' means weigh alike: some tensor's gradient measured off
        # by 1.6x its norm (each of the second half's few targets weighs several times more)
        worst = max(float((p.grad - whole[k]).norm() / whole[k].norm()) for k, p in model.named_parameters())
        assert worst > 0.05
        return
    # the same CE sums grouped in two halves: a few ulps of the loss, 16 as above
    torch.testing.assert_close(loss_split, loss_whole, rtol=16 * EPS32, atol=0)
    for name, p in model.named_parameters():
        assert_same_gradient(p.grad, whole[name], name)


def test_step_counts_must_fit_the_heads_and_normalization_is_checked():
    with pytest.raises(ValueError, match="3 loss weights for the step counts of 2 heads"):
        StepCounts((5, 4), averaged=1).scales([1.0, 1.0, 1.0])
    assert StepCounts((8, 0), averaged=4).scales([1.0, 0.5]) == [0.5, 2.0]  # an empty head: no division by 0
    with pytest.raises(ValueError, match="normalization='token'"):
        MTPLoss((1.0,), normalization="token")


@pytest.mark.parametrize("head_type", ["causal", "sequential"])
def test_chained_heads_replay_their_dropout(dist_world, tiny_model_cfg, head_type):
    """With dropout, the chained heads' re-run forward draws the masks of their first forward (the streams are
    captured per head and replayed), so the gradients are still the naive loss's for the same seed."""
    naive, eff = _models(replace(tiny_model_cfg, dropout=0.2), 3, 0, head_type=head_type)
    naive.train(), eff.train()
    tokens, valid = random_batch(tiny_model_cfg, 3, False)
    start = RandomState.capture()  # torch's generator and megatron's tracker (attention dropout)
    for model in (naive, eff):
        with start.replayed():  # the same draws for both: trunk, then the heads in chain order
            model(tokens, valid)[0].backward()
    grads_n = dict(naive.named_parameters())
    for name, p in eff.named_parameters():
        assert_same_gradient(p.grad, grads_n[name].grad, f"{head_type} {name}")
