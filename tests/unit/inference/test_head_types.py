"""Every ``mtp.head_type`` in inference: the decoder's logits (with and without the cache), self-speculative
decoding that keeps greedy's tokens, mtp-eval's numbers, and sequential heads drafting with the function
they were trained as. One briefly trained n=3 model per type (tests/conftest.py: head_type_run; their exports: test_export.py)."""

import pytest
import torch

from mtp_pretrain.config import HEAD_TYPES
from mtp_pretrain.inference.evaluate import heldout_metrics, read_batches, run_validation_data
from mtp_pretrain.inference.generate import generate
from mtp_pretrain.inference.weights import load_model
from tests.builders import held_out_prompts
from tests.numerics import assert_same_logits

# the float64 decoders (token-equality tests: see tests/unit/inference/test_generate.py's `dec`)
_FP64: dict[str, torch.nn.Module] = {}


def _fp64(run, head_type: str):  # noqa: ANN001, ANN202
    if head_type not in _FP64:
        _FP64[head_type] = load_model(run.checkpoint, torch.float64).decoder
    return _FP64[head_type]


def _tokens(vocab: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _training_logits(run, tokens: torch.Tensor, vocab: int) -> list[torch.Tensor]:  # noqa: ANN001
    """The megatron model's logits of every head on tokens [B, T], as [B, T, V] each."""
    model = run.trainer.engine.module.eval()
    return [t.transpose(0, 1)[..., :vocab] for t in model.head_logits(tokens)]


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_every_head_matches_the_training_model(head_type_run, head_type):
    run = head_type_run(head_type)
    dec = run.loaded.decoder
    assert dec.cfg.head_type == head_type
    tokens = _tokens(dec.cfg.vocab_size, (3, dec.cfg.context))
    theirs = _training_logits(run, tokens, dec.cfg.vocab_size)
    ours = dec(tokens)  # [n, B, T, V]
    assert ours.shape[0] == len(theirs) == 3
    for i, t in enumerate(theirs):
        assert_same_logits(ours[i], t)
    assert_same_logits(dec(tokens, heads=1)[0], theirs[0])  # greedy's path alone (anticausal: all heads)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_cached_decoding_equals_the_full_forward(head_type_run, head_type):
    """One token at a time, then blocks of 3 with rows at different lengths (garbage written past a row's
    length is overwritten): every head a decoding forward computes (sequential: head 1; its heads 2..n
    draft after the forward, test_sequential_drafts_are_the_trained_heads) equals the full forward."""
    dec = head_type_run(head_type).loaded.decoder
    k, T = dec.step_heads(speculative=True), 20  # noqa: N806
    tokens = _tokens(dec.cfg.vocab_size, (2, T), seed=1)
    full = dec(tokens, heads=k)  # [k, 2, T, V]
    cache = dec.new_cache(2, T)
    steps = []
    for t in range(T):
        steps.append(dec.logits(dec.hidden(tokens[:, t : t + 1], cache, k)))
        cache.lengths += 1
    assert_same_logits(torch.cat(steps, dim=2), full)

    cache = dec.new_cache(2, T + 3)
    dec.hidden(torch.stack([tokens[0, :3], torch.full((3,), 7)]), cache, k)
    cache.lengths += torch.tensor([3, 0])
    out: list[list[torch.Tensor]] = [[], []]
    for s in range(0, T - 5, 3):
        logits = dec.logits(
            dec.hidden(torch.stack([tokens[0, 3 + s : 6 + s], tokens[1, s : s + 3]]), cache, k)
        )
        out[0].append(logits[:, 0])
        out[1].append(logits[:, 1])
        cache.lengths += 3
    got0, got1 = torch.cat(out[0], dim=1), torch.cat(out[1], dim=1)
    assert_same_logits(got0, full[:, 0, 3 : 3 + got0.shape[1]])
    assert_same_logits(got1, full[:, 1, : got1.shape[1]])


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_speculative_equals_greedy_batch_1_and_batched(head_type_run, head_type):
    run = head_type_run(head_type)
    dec = _fp64(run, head_type)
    prompts = held_out_prompts(run, 12)  # 2..13 tokens: with 16 new ones within the context of 32
    reference = [generate(dec, [p], 16, speculative=False).tokens[0] for p in prompts]
    single = [generate(dec, [p], 16, speculative=True, min_tokens_per_forward=0) for p in prompts]
    assert [g.tokens[0] for g in single] == reference
    batched = generate(dec, prompts[:8], 16, speculative=True, min_tokens_per_forward=0)
    assert batched.tokens == reference[:8] and batched.stats.speculative
    assert sum(g.stats.proposed[0] for g in single) == sum(g.stats.forwards - 1 for g in single)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("wrong_at", [None, 1])
def test_accepted_and_rejected_drafts_keep_greedys_tokens(head_type_run, head_type, wrong_at):
    """Drafts replaced by the true greedy continuation (wrong at draft `wrong_at`): every forward accepts
    exactly that many, rows at different lengths roll back the rest, and the tokens stay greedy's (the heads'
    own drafting runs all the same: sequential heads keep drafting from the tokens the forward accepted)."""
    run = head_type_run(head_type)
    dec, n, new = _fp64(run, head_type), 3, 14
    prompts = held_out_prompts(run, 5)
    reference = [generate(dec, [p], new + n, speculative=False).tokens[0] for p in prompts]

    def oracle(generated: list[list[int]], drafts: torch.Tensor) -> torch.Tensor:
        out = drafts.clone()
        for b, done in enumerate(generated):
            truth = reference[b][len(done) : len(done) + n - 1]
            out[b, : len(truth)] = torch.tensor(truth)
            if wrong_at is not None:
                out[b, wrong_at] = (reference[b][len(done) + wrong_at] + 1) % dec.cfg.vocab_size
        return out

    result = generate(dec, prompts, new, speculative=True, draft_fn=oracle, min_tokens_per_forward=0)
    assert result.tokens == [r[:new] for r in reference]
    per_forward = n if wrong_at is None else wrong_at + 1
    assert result.stats.forwards == 1 + -(-(new - 1) // per_forward)


def test_sequential_drafts_are_the_trained_heads(head_type_run):
    """At every position t the decoder stood at, sequential head k's draft logits are the training model's
    head k (teacher-forced) on the tokens it read there: the true text up to t+1 (accepted, pending), then
    drafts 2..k-1. So its cache held, over the window redone, the entries those tokens give; and where those
    drafts were right, its draft is head k's on the greedy continuation itself."""
    run = head_type_run("sequential")
    dec = _fp64(run, "sequential")
    n, new, vocab = 3, 16, dec.cfg.vocab_size
    prompts = held_out_prompts(run, 8)  # batched: rows of 2..10 tokens, so windows of different starts
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (standing positions [B], draft logits [n-1, B, V])
    draft_logits = dec.draft_logits

    def record(hidden, at, pending, cache):  # noqa: ANN001, ANN202
        logits = draft_logits(hidden, at, pending, cache)
        seen.append((cache.lengths - 1, logits))
        return logits

    dec.draft_logits = record
    try:
        spec = generate(dec, prompts, new, speculative=True, min_tokens_per_forward=0)
    finally:
        del dec.draft_logits
    greedy = generate(dec, prompts, new + 2 * n, speculative=False).tokens
    assert spec.tokens == [g[:new] for g in greedy]
    visited, right = 0, [0] * (n - 1)
    for b, p in enumerate(prompts):
        text = torch.tensor(p + greedy[b])  # long enough for head n at every position stood at
        true64 = dec(text[None])[:, 0]  # teacher-forced on the true text, the decoder itself in float64
        last = -1
        for positions, logits in seen:
            t = int(positions[b])
            if t <= last:  # a finished row standing still: its drafts are dropped
                continue
            last, visited = t, visited + 1
            drafts = logits[:, b].argmax(-1)  # of tokens t+2..t+n
            read = torch.cat([text[: t + 2], drafts[: n - 2]])
            trained = _training_logits(run, read[None], vocab)
            for k in range(2, n + 1):
                # float64 vs the fp32 model: that model's fp32 rounding (a few ulps), as for the fp32 decoder
                assert_same_logits(logits[k - 2, b].float(), trained[k - 1][0, t])
                if torch.equal(drafts[: k - 2], text[t + 2 : t + k]):  # head k read the true text
                    assert int(drafts[k - 2]) == int(true64[k - 1, t].argmax())
                    right[k - 2] += 1
    # every position stood at: the drafts verified, and each row's last ones (never verified); head 3 read
    # the true text where head 2's draft was right (it was, sometimes)
    assert visited == spec.stats.proposed[0] + len(prompts) == right[0]
    assert 0 < right[1] < right[0], right


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_heldout_metrics_equal_the_trainers_validation(head_type_run, head_type):
    """mtp-eval's per-head numbers are validation's for every type: sequential heads read the batch's tokens
    after the inputs (``lookahead``) as training does."""
    run = head_type_run(head_type)
    expected = run.trainer.validate()
    datasets, mask, field = run_validation_data(run.loaded)
    t = run.trainer.cfg.trainer
    batches = read_batches(run.loaded, datasets, t.val_batches, t.micro_batch_size, field)
    got = heldout_metrics(run.loaded, batches, mask)
    for i in range(1, 4):
        # the mean fp32 cross-entropy of the same <= 256 targets (1 batch x 8 rows x 32) by two implementations:
        # rounding order only, ~sqrt(256) = 16 ulps (~2e-6 relative); 1e-5 is that with headroom
        assert got[f"loss/head{i}"] == pytest.approx(expected[f"loss/head{i}"], rel=1e-5)
        # the same top-1 hits over the same count: only the ratio's rounding may differ (no argmax flip)
        assert got[f"acc/head{i}"] == pytest.approx(expected[f"acc/head{i}"], abs=1e-6)
