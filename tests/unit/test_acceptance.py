"""Draft acceptance measured by validation (teacher-forced, HeadStats.acceptance) against real decoding."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mtp_pretrain.config import HEAD_TYPES
from mtp_pretrain.data.tokenizer import pad_id
from mtp_pretrain.inference.evaluate import heldout_metrics, read_batches, run_validation_data
from mtp_pretrain.inference.generate import DecodeStats, generate
from mtp_pretrain.inference.weights import load_model
from mtp_pretrain.loss import MTPLoss
from mtp_pretrain.targets import HeadStats, HeadTargets, joint_hits
from tests.builders import held_out_prompts


def test_joint_hits_and_the_estimate_on_a_hand_made_case() -> None:
    hits = torch.tensor(
        [
            [1, 1, 1, 0, 1, 1],  # head 1
            [1, 1, 0, 1, 1, 0],  # head 2
            [1, 0, 0, 1, 1, 0],  # head 3
        ],
        dtype=torch.bool,
    )
    joint = joint_hits(hits)
    assert joint.tolist() == [[1, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 0]]
    # head 3's last target is padding: 5 valid positions
    count = torch.tensor([6.0, 6.0, 5.0])
    stats = HeadStats(torch.zeros(3), hits.sum(1), count, joint.sum(1))
    got = stats.acceptance()
    assert got["accept_2"] == 3 / 6 and got["accept_3"] == 2 / 5 and "accept_1" not in got
    # 1 + (accept_2 + accept_3) / accept_1, accept_1 = 5/6
    assert got["tokens_per_forward"] == pytest.approx(1 + (3 / 6 + 2 / 5) / (5 / 6), rel=1e-15)
    assert HeadStats.unpacked(stats.packed()).joint.tolist() == [5.0, 3.0, 2.0]  # rides in packed()
    assert (
        HeadStats(torch.zeros(1), torch.ones(1), torch.ones(1)).acceptance() == {}
    )  # n = 1: nothing to draft


class _OneHotHeads:
    """Heads whose top-1 prediction at every position is given: head i emits one_hot(pred[i]) as its output."""

    def __init__(self, pred: torch.Tensor, vocab: int) -> None:
        self.pred, self.vocab, self.n = pred, vocab, pred.shape[0]

    def run(self, h: torch.Tensor, inputs: object):  # noqa: ANN201 - MTPHeads.run's protocol
        for i in range(self.n):
            yield i, F.one_hot(self.pred[i], self.vocab).double()


@pytest.mark.parametrize("chunk", [0, 4])
def test_validation_forward_counts_joint_hits_per_position(dist_world, chunk) -> None:
    """MTPLoss's evaluation path on a hand-made case: hits masked by padding and document boundaries."""
    vocab, T = 32, 6
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17, 18]])  # [B=1, T + n]
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[0, 8] = False  # padding: head 3's target at t=5
    segments = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1]])  # tokens 7, 8 are another document
    # pred[i, t] = what head i+1 predicts at t; right = tokens[t+i+1]. The last column names the targets it
    # must NOT count although the prediction equals them: across the document boundary / on padding.
    right = torch.stack([tokens[0, i + 1 : i + 1 + T] for i in range(3)])
    wrong = right + 1
    hit = torch.tensor([[1, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1], [1, 0, 0, 1, 1, 1]], dtype=torch.bool)
    pred = torch.where(hit, right, wrong)[:, :, None]  # [n, T, B=1]
    targets = HeadTargets(tokens, valid, segments)
    loss = MTPLoss((1.0, 1.0, 1.0), chunk_size=chunk)
    heads = _OneHotHeads(pred, vocab)
    with torch.no_grad():
        _, stats = loss(torch.zeros(T, 1, 1), heads, lambda y: 30.0 * y, None, targets, None)
    # valid: head 1 all 6 (its t=5 target, token 6, is in document 0); head 2 loses t=5 (token 7, document
    # 1); head 3 loses t=4 (token 7) and t=5 (token 8: padding and document 1)
    assert stats.count.tolist() == [6, 5, 4]
    assert stats.correct.tolist() == [5, 4, 2]  # head 2 hits t=0,1,3,4; head 3 hits t=0,3
    # heads 1..k all hit: k=1 {0,1,2,4,5}; k=2 {0,1,4}; k=3 {0}
    assert stats.joint.tolist() == [5, 3, 1]
    assert stats.acceptance() == pytest.approx(
        {"accept_2": 3 / 5, "accept_3": 1 / 4, "tokens_per_forward": 1 + (3 / 5 + 1 / 4) / (5 / 6)}
    )


def test_validation_logs_the_acceptance_mtp_eval_computes(mtp_run) -> None:
    """The trainer's validation (megatron model, MTPLoss eval path, engine reduction) and mtp-eval's
    plain-torch decoder count the same joint hits on the same batches (as test_evaluate checks acc/head)."""
    trainer = mtp_run.trainer
    got = trainer.validate()
    datasets, mask, field = run_validation_data(mtp_run.loaded)
    t = trainer.cfg.trainer
    want = heldout_metrics(
        mtp_run.loaded, read_batches(mtp_run.loaded, datasets, t.val_batches, t.micro_batch_size, field), mask
    )
    keys = ["accept_2", "accept_3", "accept_4", "tokens_per_forward"]
    assert set(keys) <= set(got) and "accept_1" not in got
    for key in keys:
        # the same hit counts over the same targets: only the ratios' rounding differs (no argmax flip)
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert 1 > got["accept_2"] > got["accept_3"] > got["accept_4"] > 0
    assert 1 < got["tokens_per_forward"] < 4


def _greedy_text_hits(dec, prompt: list[int], text: list[int], new: int) -> torch.Tensor:
    """[n, new] hits of heads 1..n at positions P-1 .. P+new-2 of prompt + text, teacher-forced (sequential
    heads read the text's tokens after those positions, as a training batch gives them: ``lookahead``)."""
    n, p = dec.cfg.mtp_heads, len(prompt)
    full = torch.tensor(prompt + text)
    logits = dec(full[None, : p + new - 1], lookahead=full[None, p + new - 1 :])[:, 0]  # [n, P+new-1, V]
    pos = torch.arange(p - 1, p + new - 1)
    return torch.stack([logits[i, pos].argmax(-1) == full[pos + i + 1] for i in range(n)])


@dataclass
class _Visited:
    """Teacher-forced joint hits [n] summed at the positions the decoder stood at (``visited`` of them) and
    at all positions, and per row the tokens a forward standing at each position gains."""

    stats: DecodeStats
    visited: int
    visited_joint: torch.Tensor
    all_joint: torch.Tensor
    per_position: list[torch.Tensor]


def _decode_and_count(dec, prompts: list[list[int]], new: int) -> _Visited:
    """Self-speculative decoding of the prompts (batched) and the teacher-forced joint hits on its greedy
    text; asserts that at the positions it stood at those are exactly the decoder's acceptance counts:
    draft k-1 (head k) accepted <=> heads 1..k all hit where it stood."""
    n = dec.cfg.mtp_heads
    greedy = generate(dec, prompts, new + n - 1, speculative=False).tokens
    emitted: list[list[int]] = [[] for _ in prompts]
    spec = generate(
        dec,
        prompts,
        new,
        speculative=True,
        min_tokens_per_forward=0,
        on_tokens=lambda b, toks: emitted[b].append(len(toks)),
    )
    assert spec.tokens == [g[:new] for g in greedy]
    out = _Visited(spec.stats, 0, torch.zeros(n), torch.zeros(n), [])
    for b, p in enumerate(prompts):
        joint = joint_hits(_greedy_text_hits(dec, p, greedy[b], new))  # [n, new]
        assert joint[0].all()  # head 1 is the greedy decoder: right at every position of its own text
        # the forward standing at P-1 (the prompt's) emits 1 token; the forward verifying the drafts made
        # at r emits a+1 tokens and stands at r + a + 1 next; the last forward's drafts are never verified
        assert emitted[b][0] == 1
        stood = [0]
        for gained in emitted[b][1:-1]:
            stood.append(stood[-1] + gained)
        assert stood[-1] < new
        out.visited += len(stood)
        out.visited_joint += joint[:, stood].sum(1)
        out.all_joint += joint.sum(1)
        out.per_position.append(joint.sum(0).double())  # tokens a forward standing there gains
    s = spec.stats
    assert out.visited == s.proposed[0]
    assert out.visited_joint[1:].tolist() == s.accepted
    return out


def test_estimate_equals_the_decoders_acceptance_on_its_own_greedy_text(mtp_run) -> None:
    """On the model's own greedy continuation, "heads 1..k all hit at t" (teacher-forced) is "drafts 2..k
    accepted by a forward standing at t" (HeadStats.acceptance): summed over the positions where the
    self-speculative decoder stood it gives the decoder's acceptance counts exactly, and over all positions
    the estimate agrees within sampling error.

    float64 (as tests/unit/inference/test_generate.py): the teacher-forced forward and the cached,
    blockwise decoder compute each logit in a different order; in float64 that noise cannot flip an argmax.
    """
    loaded = load_model(mtp_run.checkpoint, torch.float64)
    dec = loaded.decoder
    n, context = dec.cfg.mtp_heads, dec.cfg.context
    datasets, _, field = run_validation_data(loaded)
    pad = pad_id(loaded.tokenizer)
    rows = [r for b in read_batches(loaded, datasets, 4, 8, field) for r in b.tolist() if pad not in r[:40]]
    # held-out prompts of 4..11 tokens starting anywhere in a row (as training rows start)
    prompts = [r[o : o + 4 + (i + o) % 8] for i, r in enumerate(rows) for o in (0, 13, 26)]
    new = context - 11 - n + 1  # the positions t = P-1 .. P+new-2 and their targets fit the context
    got = _decode_and_count(dec, prompts, new)
    s, visited, visited_joint = got.stats, got.visited, got.visited_joint
    decoder_rate = (s.proposed[0] + sum(s.accepted)) / s.proposed[0]  # tokens per drafting forward
    at_visited = HeadStats(torch.zeros(n), visited_joint, torch.full((n,), visited), visited_joint)
    assert at_visited.acceptance()["tokens_per_forward"] == pytest.approx(decoder_rate, rel=1e-12)

    # Over all M positions the estimate is the mean of X_t = 1 + A(t) (tokens a forward at t gains); the
    # decoder's rate is its mean over the m positions it stood at, each chosen by the X of the position
    # before. Were X independent across positions, those m would be a random subset of the M, and the two
    # means would differ by sd(X) * sqrt(1/m - 1/M) (one standard error); 4 of them bound a false failure
    # at ~6e-5. Neighbouring positions are correlated in code, so this is a model, not a proof; measured
    # here: 3.318 over 1938 positions vs the decoder's 3.320 over 588, tolerance 0.155.
    x = torch.cat(got.per_position)
    every = HeadStats(torch.zeros(n), got.all_joint, torch.full((n,), x.numel()), got.all_joint)
    estimate = every.acceptance()["tokens_per_forward"]
    assert estimate == pytest.approx(x.mean().item(), rel=1e-12)
    tolerance = 4 * x.std().item() * math.sqrt(1 / visited - 1 / x.numel())
    assert abs(estimate - decoder_rate) <= tolerance, (estimate, decoder_rate, tolerance)
    assert 1.5 < decoder_rate < n  # the run drafts, and drafts are sometimes rejected: a real test


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_estimate_at_the_decoders_positions_is_its_acceptance_for_every_head_type(
    head_type_run,
    head_type,
) -> None:
    """The exact half of the test above for every ``mtp.head_type`` (tests/conftest.py head_type_run: briefly
    trained n=3 models, too little for the statistical half): where the decoder stood, the teacher-forced
    joint hits are its acceptance counts. For sequential heads this holds because their drafting computes
    the trained function of the tokens it drafted (test_head_types.py). float64, as above."""
    run = head_type_run(head_type)
    dec = load_model(run.checkpoint, torch.float64).decoder
    prompts = held_out_prompts(run, 16)
    # the positions t = P-1 .. P+new-2 and their targets fit the context (n = 3)
    got = _decode_and_count(dec, prompts, dec.cfg.context - max(map(len, prompts)) - 3 + 1)
    # the comparison met accepted drafts of head 2 (heads 3 of these short runs may never be right)
    assert got.stats.accepted[0] > 0, got.stats.accepted
