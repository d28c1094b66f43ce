"""Self-speculative decoding gives exactly the greedy tokens; sampling, stopping and bad input."""

import json

import pytest
import torch

from mtp_pretrain.data.tokenizer import train_tokenizer
from mtp_pretrain.inference.cli import generate as generate_cli
from mtp_pretrain.inference.generate import PROBE_FORWARDS, Sampling, generate, generate_text
from mtp_pretrain.inference.weights import load_model
from tests.builders import held_out_prompts


@pytest.fixture(scope="module")
def dec(mtp_run):
    """The trained decoder in float64, for the tests that compare tokens decoded along different paths.

    What they prove is decoding logic (drafts, acceptance, rollback, batching) keeping greedy's tokens.
    Those paths compute each logit over other blocks and batches: in fp32 that is reordering noise of ~5 ulps
    of the logits' scale (tests/unit/inference/test_model.py), which flips an argmax wherever the top two
    logits are that close (the closest pair met here is 550 ulps apart; other CPUs train other weights). In
    float64 that noise is ~1e-9 of an fp32 ulp: no tie is that close.
    """
    return load_model(mtp_run.checkpoint, torch.float64).decoder


def _greedy(dec, prompts, new, eos=None) -> list[list[int]]:
    return [generate(dec, [p], new, eos=eos, speculative=False).tokens[0] for p in prompts]


def test_speculative_equals_greedy_batch_1_and_batched(mtp_run, dec):
    prompts = held_out_prompts(mtp_run, 24)
    reference = _greedy(dec, prompts, 24)
    single = [generate(dec, [p], 24, speculative=True, min_tokens_per_forward=0) for p in prompts]
    assert [g.tokens[0] for g in single] == reference
    batched = generate(dec, prompts[:8], 24, speculative=True, min_tokens_per_forward=0)
    assert batched.tokens == reference[:8]
    assert generate(dec, prompts[:8], 24, speculative=False).tokens == reference[:8]

    # the run met both outcomes: drafts accepted and drafts rejected, by every extra head
    proposed = [sum(g.stats.proposed[j] for g in single) for j in range(3)]
    accepted = [sum(g.stats.accepted[j] for g in single) for j in range(3)]
    assert all(0 < a < p for a, p in zip(accepted, proposed, strict=True)), (accepted, proposed)
    assert sum(g.stats.forwards for g in single) < sum(
        len(r) for r in reference
    )  # fewer forwards than tokens


@pytest.mark.parametrize("wrong_at", [None, 0, 1, 2])
def test_rollback_after_a_rejection_at_every_draft_position(mtp_run, dec, wrong_at):
    """Drafts replaced by the true greedy continuation, wrong at draft position `wrong_at`: exactly
    `wrong_at` drafts are accepted per forward, the cache rolls back the rest, tokens stay greedy's."""
    n, vocab = dec.cfg.mtp_heads, dec.cfg.vocab_size
    prompts = held_out_prompts(mtp_run, 6)
    new = 20
    reference = _greedy(dec, prompts, new + n)

    def oracle(generated: list[list[int]], drafts: torch.Tensor) -> torch.Tensor:
        out = drafts.clone()
        for b, done in enumerate(generated):
            truth = reference[b][len(done) : len(done) + n - 1]
            out[b, : len(truth)] = torch.tensor(truth)
            if wrong_at is not None:
                out[b, wrong_at] = (reference[b][len(done) + wrong_at] + 1) % vocab
        return out

    result = generate(dec, prompts, new, speculative=True, draft_fn=oracle, min_tokens_per_forward=0)
    assert result.tokens == [r[:new] for r in reference]
    per_forward = n if wrong_at is None else wrong_at + 1
    # the prompt's forward gives 1 token, every later one `per_forward` (the last may overshoot the limit)
    assert result.stats.forwards == 1 + -(-(new - 1) // per_forward)
    if wrong_at is not None:
        assert result.stats.accepted[wrong_at] == 0 and result.stats.proposed[wrong_at] > 0


@pytest.mark.parametrize("wrong_at", [None, 0])
def test_drafting_stops_when_it_does_not_pay(mtp_run, dec, wrong_at):
    """Drafts always right (4 tokens/forward) keep drafting; drafts always rejected (1 token/forward) stop
    after the probe, and decoding goes on plainly: one token per forward, greedy's tokens."""
    n, new = dec.cfg.mtp_heads, 40
    prompts = held_out_prompts(mtp_run, 2)
    reference = _greedy(dec, prompts, new + n)

    def oracle(generated: list[list[int]], drafts: torch.Tensor) -> torch.Tensor:
        out = drafts.clone()
        for b, done in enumerate(generated):
            truth = torch.tensor(reference[b][len(done) : len(done) + n - 1])
            out[b, : len(truth)] = truth if wrong_at is None else (truth + 1) % dec.cfg.vocab_size
        return out

    result = generate(dec, prompts, new, speculative=True, draft_fn=oracle)  # the default threshold (1.5)
    assert result.tokens == [r[:new] for r in reference]
    if wrong_at is None:
        assert result.stats.drafting_stopped_at is None and result.stats.forwards == 1 + -(-(new - 1) // n)
    else:
        assert result.stats.drafting_stopped_at == 1 + PROBE_FORWARDS
        assert result.stats.forwards == new  # every forward after the prompt's gave one token
        assert result.stats.proposed[0] == PROBE_FORWARDS * len(prompts)  # nothing counted once stopped


def test_stops_at_eos_and_at_the_context(mtp_run, dec):
    prompt = held_out_prompts(mtp_run, 1)[0]
    ref = _greedy(dec, [prompt], 30)[0]
    k = next(i for i in range(3, 30) if ref[i] not in ref[:i])  # a token first produced at position k
    for spec in (False, True):
        assert generate(dec, [prompt], 30, eos=ref[k], speculative=spec).tokens[0] == ref[:k]
    long_prompt = (prompt * 40)[: dec.cfg.context - 5]
    with pytest.warns(UserWarning, match="context of 48 tokens"):
        out = generate(dec, [long_prompt, prompt], 30, speculative=True)
    assert len(out.tokens[0]) == 5 and out.tokens[0] == _greedy(dec, [long_prompt], 5)[0]
    assert out.tokens[1] == ref


def test_sampling_is_seeded_and_top_k_1_is_greedy(mtp_run, dec):
    prompts = held_out_prompts(mtp_run, 3)
    hot = Sampling(temperature=1.5, top_p=0.95, seed=3)
    a, b = generate(dec, prompts, 20, sampling=hot), generate(dec, prompts, 20, sampling=hot)
    assert a.tokens == b.tokens and not a.stats.speculative  # speculation is for greedy decoding
    assert generate(dec, prompts, 20, sampling=Sampling(temperature=1.5, seed=4)).tokens != a.tokens
    top1 = generate(dec, prompts, 20, sampling=Sampling(temperature=0.7, top_k=1, seed=5))
    assert top1.tokens == _greedy(dec, prompts, 20)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_bad_input_is_named(mtp_run, tmp_path):
    loaded = mtp_run.loaded
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_text(loaded, ["def f(", ""], 4)
    with pytest.raises(ValueError, match="prompt 0 has 49 tokens, longer than the model's context of 48"):
        generate(loaded.decoder, [[5] * 49], 4)
    other = train_tokenizer(["completely different text " * 50, "zzz yyy"], 280, tmp_path / "other.json")
    assert other.get_vocab_size() != loaded.decoder.cfg.vocab_size
    with pytest.raises(ValueError, match="not the one this model was trained with"):
        load_model(mtp_run.checkpoint, tokenizer=tmp_path / "other.json")


def test_a_model_without_extra_heads_decodes_plainly(mtp_run, dec, tmp_path):
    """An export reduced to the plain Llama (no mtp_heads file, n=1): a warning, then plain greedy decoding
    that equals head 1 of the full model."""
    from mtp_pretrain.cli import export

    out = tmp_path / "hf"
    export([str(mtp_run.checkpoint), "--out", str(out)])
    (out / "mtp_heads.safetensors").unlink()
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "mtp_n_heads": 1}))
    with pytest.warns(UserWarning, match="no extra MTP heads"):
        plain = load_model(out, torch.float64)  # float64 as `dec`: batched here, one prompt at a time there
    prompts = held_out_prompts(mtp_run, 4)
    result = generate(plain.decoder, prompts, 16, speculative=True)
    assert not result.stats.speculative and result.tokens == _greedy(dec, prompts, 16)


def test_cli_streams_the_completion(mtp_run, tmp_path, capsys, monkeypatch):
    prompt = "def f_1_2(x, y=2):\n"
    # what the CLI runs (the same fp32 weights, prompts and batch, self-speculative): the same computation,
    # so the same text exactly (that speculation keeps greedy's tokens is proved above, in float64)
    texts, _ = generate_text(mtp_run.loaded, [prompt, "import os\n"], 24)
    (tmp_path / "p.txt").write_text("import os\n")
    generate_cli(
        [
            str(mtp_run.checkpoint),
            "--prompt",
            prompt,
            "--prompt-file",
            str(tmp_path / "p.txt"),
            "--max-new-tokens",
            "24",
            "--stats-json",
            str(tmp_path / "s.json"),
        ]
    )
    captured = capsys.readouterr()
    assert captured.out.startswith(texts[0]) and f"--- prompt 1 ---\n{texts[1]}" in captured.out
    assert "[self-speculative]" in captured.err and "tokens/forward" in captured.err
    assert json.loads((tmp_path / "s.json").read_text())["speculative"] is True

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(prompt))  # no --prompt: read stdin
    generate_cli([str(mtp_run.checkpoint), "--max-new-tokens", "24", "--no-speculative"])
    plain, _ = generate_text(mtp_run.loaded, [prompt], 24, speculative=False)  # again the CLI's computation
    assert capsys.readouterr().out.startswith(plain[0])

    with pytest.raises(SystemExit) as exit_:
        generate_cli([str(mtp_run.checkpoint), "--prompt", ""])
    assert exit_.value.code == 2 and "prompt 0 is empty" in capsys.readouterr().err
