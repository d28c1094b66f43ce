"""mtp-export: the Hugging Face Llama directory computes the trained model's next-token logits; the directory is
written whole, readable like any file, and a bad --out is one error line before any work."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mtp_pretrain import export as export_module
from mtp_pretrain.cli import export
from mtp_pretrain.config import HEAD_TYPES
from mtp_pretrain.data.tokenizer import load_tokenizer
from mtp_pretrain.errors import EXIT_CHECKPOINT, EXIT_USAGE, UsageError
from mtp_pretrain.export import MTP_FILE, TMP_PREFIX, export_checkpoint, write_export
from mtp_pretrain.inference.weights import load_model
from mtp_pretrain.trainer import Trainer
from tests.conftest import compose_config, tiny_run_overrides
from tests.numerics import assert_same_logits


@pytest.mark.parametrize("tie", [False, True])
def test_export_round_trips_through_transformers(dist_world, synthetic_source, tmp_path, tie, capsys):
    transformers = pytest.importorskip("transformers")
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
    ours = load_tokenizer(trainer.tokenizer_path)
    for text in [(synthetic_source / "mod_000.py").read_text(), "x = '<|endoftext|>'"]:  # special text: bytes
        ids = ours.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False) == ids and tok.decode(ids) == text
    assert tok.eos_token_id == 0
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(EXPECTED_FILES, 0o644)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_export_holds_every_head_and_loads_the_same_decoder(
    head_type_run,
    head_type,
    tmp_path,
):
    """Heads 2..n of every type are exported as the module docstring of export.py says (the fp32 weights
    copied, so exactly), and the export loads the decoder the checkpoint loads."""
    run = head_type_run(head_type)
    out = tmp_path / "hf"
    export([str(run.checkpoint), "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["mtp_head_type"] == head_type and config["mtp_n_heads"] == 3
    assert config["num_hidden_layers"] == (4 if head_type == "anticausal" else 2)  # L = 4, n = 3
    extra = load_file(out / MTP_FILE) if (out / MTP_FILE).exists() else {}
    main = load_file(out / "model.safetensors")
    heads = run.trainer.engine.module.heads.layers  # the export copies the fp32 weights: exact
    expected = {"parallel": 2 * 9, "causal": 2 * 9, "linear": 2, "sequential": 2 * (4 + 9), "anticausal": 0}
    assert len(extra) == expected[head_type]
    for k in (1, 2):
        if head_type == "linear":
            assert torch.equal(extra[f"mtp_heads.{k}.weight"], heads[k].weight)
        elif head_type == "sequential":
            for name in ("enorm", "hnorm", "eh_proj"):
                assert torch.equal(extra[f"mtp_heads.{k}.{name}.weight"], getattr(heads[k], name).weight)
            assert torch.equal(extra[f"mtp_heads.{k}.norm.weight"], heads[k].final_layernorm.weight)
            o_proj = heads[k].transformer_layer.self_attention.linear_proj.weight
            assert torch.equal(extra[f"mtp_heads.{k}.self_attn.o_proj.weight"], o_proj)
        elif head_type == "anticausal":  # layers 1..3 are heads 3..1: heads.layers.<k> (head k+1) is 3 - k
            o_proj = heads[k].self_attention.linear_proj.weight
            assert torch.equal(main[f"model.layers.{3 - k}.self_attn.o_proj.weight"], o_proj)
        else:
            o_proj = heads[k].self_attention.linear_proj.weight
            assert torch.equal(extra[f"mtp_heads.{k}.self_attn.o_proj.weight"], o_proj)
    from_export = load_model(out).decoder.state_dict()
    for name, t in run.loaded.decoder.state_dict().items():  # the same fp32 values: exact
        assert torch.equal(t, from_export[name]), name


def test_anticausal_export_is_a_llama_computing_every_head(
    head_type_run,
    tmp_path,
):
    """transformers' Llama on the export: its logits are head 1's, and layer L-k's output through the
    final norm and lm_head is head k's (the module docstring of export.py)."""
    transformers = pytest.importorskip("transformers")
    run = head_type_run("anticausal")
    out = tmp_path / "hf"
    export([str(run.checkpoint), "--out", str(out)])
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    vocab = run.loaded.decoder.cfg.vocab_size
    tokens = torch.randint(2, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = [t.transpose(0, 1)[..., :vocab] for t in run.trainer.engine.module.eval().head_logits(tokens)]
    with torch.no_grad():
        got = hf(tokens, output_hidden_states=True)
        # hidden_states[j] is layer j-1's output (the last one normed already); head 2 is layer 2 of 0..3
        head2 = hf.lm_head(hf.model.norm(got.hidden_states[3]))
    # transformers' Llama vs megatron's blocks: fp32 reordering, as in the parallel round trip above
    assert_same_logits(got.logits, ours[0])
    assert_same_logits(head2, ours[1])


EXPECTED_FILES = ["config.json", "model.safetensors", MTP_FILE, "tokenizer.json", "tokenizer_config.json"]


def test_export_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export([str(tmp_path), "--out", str(tmp_path / "hf")])
    assert exit_.value.code == EXIT_CHECKPOINT and "mtp_checkpoint.json" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def _fake_export(n_heads: int, value: float = 0.0) -> tuple[dict, dict[str, torch.Tensor], str]:
    """What checkpoint_as_llama returns, without a checkpoint: the writing does not look inside."""
    config = {"model_type": "llama", "max_position_embeddings": 16, "mtp_n_heads": n_heads}
    tensors = {"model.norm.weight": torch.full((4,), value)}
    tensors.update({f"mtp_heads.{k}.input_layernorm.weight": torch.ones(4) for k in range(1, n_heads)})
    return config, tensors, '{"not": "parsed"}'


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_export_files_have_plain_open_modes(tmp_path, mask):
    old = os.umask(mask)
    try:
        (tmp_path / "plain").write_text("")  # the mode any other tool's file gets
        (tmp_path / "plain_dir").mkdir()
        write_export(tmp_path / "hf", *_fake_export(3))
        (tmp_path / "again").mkdir(mode=0o755)  # an existing (empty) directory keeps its own mode
        write_export(tmp_path / "again", *_fake_export(3))
    finally:
        os.umask(old)
    plain, plain_dir = (
        (tmp_path / "plain").stat().st_mode & 0o777,
        (tmp_path / "plain_dir").stat().st_mode & 0o777,
    )
    assert plain == 0o666 & ~mask  # safetensors alone writes 0600
    for d in ["hf", "again"]:
        assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / d).iterdir()} == dict.fromkeys(
            EXPECTED_FILES, plain
        )
    assert (tmp_path / "hf").stat().st_mode & 0o777 == plain_dir
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_out_naming_a_file_is_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "model.bin"
    out.write_bytes(b"precious")
    with pytest.raises(UsageError, match="existing file") as error:  # before the (missing) checkpoint is read
        export_checkpoint(tmp_path / "no_such_checkpoint", out)
    assert str(out) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UsageError, match="is a file"):  # a file as a parent of --out
        export_checkpoint(tmp_path / "no_such_checkpoint", out / "hf")
    with pytest.raises(SystemExit) as exit_:
        export([str(tmp_path / "no_such_checkpoint"), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == EXIT_USAGE and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mtp-export: error: --out ") and str(out) in err
    assert out.read_bytes() == b"precious"


def test_out_holding_something_else_is_refused(tmp_path):
    out = tmp_path / "other_model"
    out.mkdir()
    (out / "config.json").write_text(
        '{"model_type": "gpt2"}'
    )  # another model's export: not ours to overwrite
    with pytest.raises(UsageError, match="holds no earlier mtp-export"):
        write_export(out, *_fake_export(1))
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_earlier_export_is_replaced_whole_and_other_files_kept(tmp_path):
    out = tmp_path / "hf"
    write_export(out, *_fake_export(3))
    (out / "README.md").write_text("mine")
    write_export(out, *_fake_export(1, value=2.0))  # like save_pretrained: overwrite; n=1 has no extra heads
    assert sorted(p.name for p in out.iterdir()) == sorted({*EXPECTED_FILES, "README.md"} - {MTP_FILE})
    assert json.loads((out / "config.json").read_text())["mtp_n_heads"] == 1
    assert torch.equal(load_file(out / "model.safetensors")["model.norm.weight"], torch.full((4,), 2.0))
    assert (out / "README.md").read_text() == "mine"


def test_failed_export_leaves_nothing_half_written(tmp_path, monkeypatch):
    calls = []

    def save_then_fail(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second file (mtp_heads) fails: the disk filled up, say
            raise OSError(28, "No space left on device")
        open(path, "wb").close()

    out = tmp_path / "hf"
    monkeypatch.setattr(export_module, "save_file", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_export(out, *_fake_export(3))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # no temp dir either

    monkeypatch.undo()
    write_export(out, *_fake_export(3))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(export_module, "save_file", save_then_fail)
    calls.clear()
    with pytest.raises(OSError, match="No space"):
        write_export(out, *_fake_export(3, value=5.0))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export, untouched
