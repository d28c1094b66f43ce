"""On CUDA, self-speculative decoding gives exactly the greedy tokens (tests/unit/inference/test_generate.py
on CPU), for the model the session's NCCL training run produced (tests/conftest.py: mtp_run)."""

import torch

from mtp_pretrain.inference.generate import generate
from mtp_pretrain.inference.weights import load_model
from tests.builders import held_out_prompts


def test_speculative_equals_greedy_on_cuda(mtp_run):
    # float64, as on CPU: speculative and greedy decoding compute each logit over other batches and blocks,
    # reordering noise that flips an argmax only where two logits are that close; in float64 none is
    dec = load_model(mtp_run.checkpoint, torch.float64, device="cuda").decoder
    assert dec.embed.device.type == "cuda"
    prompts = held_out_prompts(mtp_run, 12)
    greedy = [generate(dec, [p], 24, speculative=False).tokens[0] for p in prompts]
    single = [generate(dec, [p], 24, speculative=True, min_tokens_per_forward=0) for p in prompts]
    assert [r.tokens[0] for r in single] == greedy
    assert sum(sum(r.stats.accepted) for r in single) > 0  # drafts were accepted: speculation happened
    batched = generate(dec, prompts[:8], 24, speculative=True, min_tokens_per_forward=0)
    assert batched.tokens == greedy[:8]
