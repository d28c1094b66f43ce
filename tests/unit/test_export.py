"""mtp-export: the Hugging Face Llama directory computes the trained model's next-token logits."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mtp_pretrain.cli import export
from mtp_pretrain.data.tokenizer import load_tokenizer
from mtp_pretrain.trainer import Trainer
from tests.conftest import compose_config, tiny_run_overrides
from tests.numerics import assert_same_logits

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tie", [False, True])
def test_export_round_trips_through_transformers(dist_world, synthetic_source, tmp_path, tie, capsys):
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local directory: nothing may be fetched
    overrides = tiny_run_overrides(
        synthetic_source,
        tmp_path / "cache",
        tmp_path / "run",
        **{
            "trainer.steps": 2,
            "model.num_layers": 4,
            "mtp.n": 3,
            "model.num_query_groups": 1,
            "model.tie_embeddings": str(tie).lower(),
        },
    )
    trainer = Trainer(compose_config(*overrides))
    result = trainer.fit()
    out = tmp_path / "hf"
    export([str(result.checkpoint), "--out", str(out)])
    assert f"exported {result.checkpoint}" in capsys.readouterr().out

    config = json.loads((out / "config.json").read_text())
    assert (
        config["num_hidden_layers"] == 2 and config["mtp_n_heads"] == 3 and config["num_key_value_heads"] == 1
    )
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    model = trainer.engine.module.eval()
    tokens = torch.randint(2, trainer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.head_logits(tokens, heads=1)[0].transpose(0, 1)[..., : trainer.vocab_size]  # [B, T, V]
        theirs = hf(tokens).logits
    assert theirs.shape == ours.shape
    assert_same_logits(theirs, ours)  # transformers' Llama: measured <= 1.7 ulps of the logits' scale

    extra = load_file(out / "mtp_heads.safetensors")  # heads 2 and 3, as Llama layers
    assert len(extra) == 2 * 9
    heads = model.heads.layers  # the export copies the fp32 weights: exact
    assert torch.equal(
        extra["mtp_heads.2.self_attn.o_proj.weight"], heads[2].self_attention.linear_proj.weight
    )
    assert torch.equal(extra["mtp_heads.1.mlp.down_proj.weight"], heads[1].mlp.linear_fc2.weight)

    tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    text = (synthetic_source / "mod_000.py").read_text()
    ids = load_tokenizer(trainer.tokenizer_path).encode(text, add_special_tokens=False).ids
    assert tok.encode(text, add_special_tokens=False) == ids and tok.eos_token_id == 0


def test_export_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export([str(tmp_path), "--out", str(tmp_path / "hf")])
    assert exit_.value.code == 2 and "mtp_checkpoint.json" in capsys.readouterr().err
