"""The head types (mtp.head_type): sequential heads are megatron-core's built-in MTP modules (same losses
from the same weights), every type has its parameters and runs its chain in the order its reads need."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mtp_pretrain.build import build_model
from mtp_pretrain.config import HEAD_TYPES, MTPConfig
from mtp_pretrain.model.attention import layer_spec
from mtp_pretrain.model.mtp_model import transformer_config
from mtp_pretrain.model.vocab import padded_vocab_size
from tests.builders import VOCAB
from tests.numerics import EPS32


def _megatron_gpt(cfg, n: int):
    """megatron's GPTModel: the trunk + head 1 as its decoder (K + 1 layers), heads 2..n as mtp_num_layers."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    tconf = transformer_config(cfg, MTPConfig(n=n))
    tconf.num_layers += 1  # our trunk (L - n blocks) + head 1's block
    tconf.mtp_num_layers = n - 1
    spec = layer_spec(cfg.attention)
    return GPTModel(
        tconf,
        spec,
        vocab_size=padded_vocab_size(VOCAB, 1),
        max_sequence_length=cfg.seq_len + n,
        position_embedding_type="rope",
        mtp_block_spec=get_gpt_mtp_block_spec(tconf, spec, use_transformer_engine=False),
    ).eval()


def _copy_megatron_weights(gpt, ours, trunk: int) -> None:
    """Megatron's names -> ours: decoder layer K is head 1, its final norm the shared one, MTP depth d head d+1."""
    theirs = gpt.state_dict()
    mapped = {}
    for name, t in theirs.items():
        if "_extra_state" in name:
            continue
        if name.startswith(f"decoder.layers.{trunk}."):
            name = "heads.layers.0." + name[len(f"decoder.layers.{trunk}.") :]
        elif name.startswith("decoder.final_layernorm."):
            name = "heads.final_layernorm." + name[len("decoder.final_layernorm.") :]
        elif name.startswith("mtp.layers."):
            depth, rest = name[len("mtp.layers.") :].split(".", 1)
            name = f"heads.layers.{int(depth) + 1}.{rest}"
        mapped[name] = t
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected and all("_extra_state" in k for k in missing), (missing, unexpected)


def test_sequential_heads_are_megatrons_mtp_modules(dist_world, tiny_model_cfg):
    """Weights copied from megatron-core's GPTModel with mtp_num_layers = n-1 give our sequential heads the
    same per-head losses (head 1 = its next-token prediction, head k = its MTP depth k-1)."""
    n = 3
    cfg = replace(tiny_model_cfg, attention="local")
    gpt = _megatron_gpt(cfg, n)
    mtp = MTPConfig(n=n, head_type="sequential", loss_weights=[1.0] * n)
    ours = build_model(cfg, mtp, VOCAB, transformer_config(cfg, mtp)).eval()
    _copy_megatron_weights(gpt, ours, trunk=cfg.num_layers - n)

    T = cfg.seq_len  # noqa: N806
    tokens = torch.randint(2, VOCAB, (3, T + n), generator=torch.Generator().manual_seed(3))
    captured = {}
    gpt.mtp.register_forward_hook(lambda _m, _i, out: captured.setdefault("hidden", out))
    ids = tokens[
        :, : T + n - 1
    ]  # megatron rolls its inputs: depth d at t < T reads tokens <= t + d, all here
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        gpt(ids, positions, None, labels=tokens[:, 1 : T + n])
        _, stats = ours(tokens)
    theirs = []
    for k, hidden in enumerate(captured["hidden"].chunk(n, dim=0), start=1):  # [S, B, d] per prediction
        logits, _ = gpt.output_layer(hidden[:T])
        target = tokens[:, k : k + T].t()
        theirs.append(F.cross_entropy(logits[..., :VOCAB].flatten(0, 1), target.flatten()).item())
    got = (stats.loss_sum / stats.count).tolist()
    # the same fp32 blocks, norms and projections in the same order; the CE sums 3 x T terms in another
    # order (ours vocab-parallel, theirs torch's): a few ulps of each loss, 16 as in tests/unit/test_loss.py
    assert got == pytest.approx(theirs, rel=16 * EPS32), (got, theirs)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_each_type_reads_what_its_design_says(dist_world, tiny_model_cfg, head_type):
    """Perturbing what a head reads changes its output and nothing upstream of it: the chain order."""
    n = 3
    mtp = MTPConfig(n=n, head_type=head_type)
    model = build_model(tiny_model_cfg, mtp, VOCAB, transformer_config(tiny_model_cfg, mtp)).eval()
    assert model.heads.n == n and len(model.decoder.layers) == tiny_model_cfg.num_layers - n
    tokens = torch.randint(2, VOCAB, (2, tiny_model_cfg.seq_len), generator=torch.Generator().manual_seed(0))
    before = model.head_logits(tokens)
    with torch.no_grad():  # head 3's own weights (its block's output projection, or its linear map)
        next(
            p
            for name, p in model.heads.layers[2].named_parameters()
            if name.endswith("weight") and p.dim() == 2
        ).mul_(2)
    after = model.head_logits(tokens)
    assert len(model.head_logits(tokens, heads=1)) == 1  # anticausal runs every head, returns the one asked
    changed = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
    # anticausal: head 3 feeds heads 2 and 1; every other design: heads 1 and 2 do not read head 3
    assert changed == ([True, True, True] if head_type == "anticausal" else [False, False, True])
