"""Export a training checkpoint (any TP x PP x DP layout) as a Hugging Face transformers Llama directory.

    mtp-export outputs/tiny-n4/checkpoints/step_00000400 --out exported/

The MTP model *is* a Llama decoder when read along the next-token path: trunk blocks 1..L-n, then head 1's
block, the shared final norm and the shared unembedding. So the export writes

    config.json              LlamaConfig with num_hidden_layers = L - n + 1 (+ "mtp_n_heads": n)
    model.safetensors        embed_tokens, layers 0..L-n (the last is head 1), norm, lm_head
    mtp_heads.safetensors    heads 2..n as "mtp_heads.<k>.<the same Llama layer names>", k = 1..n-1
    tokenizer.json (+ tokenizer_config.json)   the run's tokenizer, loadable by PreTrainedTokenizerFast or
                             AutoTokenizer (transformers >= 4.45), encoding any text as the project does

Weight mapping from megatron-core (local spec, no biases): ``linear_qkv`` holds, per query group, that
group's query heads then one key and one value head — split into q/k/v_proj; ``linear_fc1`` is
[gate; up] (SwiGLU); the input/pre-MLP norms are stored as ``linear_qkv/linear_fc1.layer_norm_weight``.
RoPE is the rotate-half form in both, so no permutation is needed. Padding rows of the vocabulary are
dropped. Nothing is unpickled: the checkpoint is verified first and read as plain tensors. The directory is
never half-written (:func:`write_export`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from mtp_pretrain.config import Config, ffn_hidden_size, from_yaml
from mtp_pretrain.data.tokenizer import transformers_files
from mtp_pretrain.errors import UsageError

MTP_PREFIX = "mtp_heads."  # heads 2..n, kept out of the plain Llama's model.safetensors
MTP_FILE = "mtp_heads.safetensors"
EXPORT_FILES = ("config.json", "model.safetensors", MTP_FILE, "tokenizer.json", "tokenizer_config.json")
TMP_PREFIX = ".mtp-export-tmp-"  # the directory an export is written into before it is moved into place
LAYER_KEYS = {  # megatron name (below decoder.layers / heads.layers.<i>) -> Llama name (below model.layers.<j>)
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def llama_config(cfg: Config, vocab_size: int) -> dict:
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": ffn_hidden_size(m),
        "num_hidden_layers": m.num_layers - cfg.mtp.n + 1,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": float(m.rotary_base),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": 0,  # documents are separated by EOS only: it also starts generation
        "eos_token_id": 0,
        "pad_token_id": 1,
        "torch_dtype": "float32",
        "mtp_n_heads": cfg.mtp.n,  # extra field: the heads beyond the first are in mtp_heads.safetensors
    }


def _layer(get, prefix: str, cfg: Config) -> dict[str, torch.Tensor]:
    """One megatron block (``get(name)`` -> tensor) as Llama layer tensors."""
    m = cfg.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    head_dim = m.hidden_size // heads
    qkv = get(f"{prefix}self_attention.linear_qkv.weight").view(groups, (heads // groups + 2) * head_dim, -1)
    q, k, v = qkv.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    gate, up = get(f"{prefix}mlp.linear_fc1.weight").chunk(2, dim=0)
    out = {llama: get(prefix + ours) for ours, llama in LAYER_KEYS.items()}
    out.update(
        {
            "self_attn.q_proj.weight": q.reshape(heads * head_dim, -1),
            "self_attn.k_proj.weight": k.reshape(groups * head_dim, -1),
            "self_attn.v_proj.weight": v.reshape(groups * head_dim, -1),
            "mlp.gate_proj.weight": gate,
            "mlp.up_proj.weight": up,
        }
    )
    return {name: t.contiguous().clone() for name, t in out.items()}


def checkpoint_as_llama(ckpt: str | Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(Llama config, tensors, tokenizer JSON) of checkpoint ``ckpt``, gathered from any layout into this
    process. Tensors use the Llama names; heads 2..n are ``mtp_heads.<k>.<layer name>``, k = 1..n-1."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    from mtp_pretrain import parallel
    from mtp_pretrain.checkpoint import Checkpointer, CheckpointError

    ckpt = Path(ckpt)
    common = Checkpointer.read_common(ckpt)
    if "tokenizer_json" not in common:
        raise CheckpointError(f"{ckpt} holds no tokenizer (written by an older version); re-save it")
    cfg = from_yaml(common["config"])
    vocab_size = Tokenizer.from_str(common["tokenizer_json"]).get_vocab_size()
    parallel.init_distributed()  # dist_checkpointing reads through torch.distributed (a world of one here)
    plain = load_plain_tensors(str(ckpt))
    trunk = cfg.model.num_layers - cfg.mtp.n

    def head_get(name: str) -> torch.Tensor:
        return plain[name]

    tensors: dict[str, torch.Tensor] = {}
    for i in range(trunk):  # megatron stores the trunk's blocks stacked along a layer dimension
        for name, t in _layer(lambda n, i=i: plain[f"decoder.layers.{n}"][i], "", cfg).items():
            tensors[f"model.layers.{i}.{name}"] = t
    for name, t in _layer(head_get, "heads.layers.0.", cfg).items():
        tensors[f"model.layers.{trunk}.{name}"] = t
    tensors["model.embed_tokens.weight"] = plain["embedding.word_embeddings.weight"][:vocab_size].clone()
    tensors["model.norm.weight"] = plain["heads.final_layernorm.weight"].clone()
    if not cfg.model.tie_embeddings:
        tensors["lm_head.weight"] = plain["output_layer.weight"][:vocab_size].clone()
    for k in range(1, cfg.mtp.n):
        for name, t in _layer(head_get, f"heads.layers.{k}.", cfg).items():
            tensors[f"{MTP_PREFIX}{k}.{name}"] = t
    return llama_config(cfg, vocab_size), tensors, common["tokenizer_json"]


def _is_export(d: Path) -> bool:
    """Whether directory ``d`` holds an earlier mtp-export (its config.json names the MTP heads)."""
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "mtp_n_heads" in config


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path if an export can be written there: a new path (parents are created), an empty
    directory, or a directory holding an earlier mtp-export (its export files are replaced, others kept, as
    transformers' ``save_pretrained`` does). Otherwise a :class:`UsageError` naming the path and the fix."""
    out = Path(out_dir)
    fix = "pass --out a new or empty directory"
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out} is a dangling symbolic link; remove it or {fix}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file, not a directory; {fix} (or remove the file)")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(TMP_PREFIX))
        if entries and not _is_export(out):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise UsageError(
                f"--out {out} is not empty ({shown}) and holds no earlier mtp-export (a config.json with "
                f'"mtp_n_heads"); {fix}'
            )
        target = out
    else:
        target = next(a for a in out.absolute().parents if a.exists() or a.is_symlink())
        if not target.is_dir():
            raise UsageError(f"--out {out}: {target} is a file, not a directory; {fix}")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out {out}: cannot write into {target} (permission denied); {fix} that you can write"
        )
    return out


def _umask() -> int:
    """The process umask (there is no getter; mtp-export creates no files from other threads meanwhile)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_files(d: Path, config: dict, tensors: dict[str, torch.Tensor], tokenizer_json: str) -> list[str]:
    """Write the export into the empty directory ``d``; returns the names written."""
    main = {name: t for name, t in tensors.items() if not name.startswith(MTP_PREFIX)}
    extra = {name: t for name, t in tensors.items() if name.startswith(MTP_PREFIX)}
    save_file(main, str(d / "model.safetensors"), metadata={"format": "pt"})
    if extra:
        save_file(extra, str(d / MTP_FILE), metadata={"format": "pt"})
    for name, text in transformers_files(tokenizer_json, config["max_position_embeddings"]).items():
        (d / name).write_text(text)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    return sorted(p.name for p in d.iterdir())


def write_export(
    out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor], tokenizer_json: str
) -> Path:
    """Write an export (:func:`checkpoint_as_llama`'s results) into ``out_dir`` (see :func:`check_out_dir`).

    Nothing is half-written: the files are written into a temporary directory first, which a new ``out_dir``
    becomes by one rename; into an existing directory each file is moved by an atomic rename, and export
    files of an earlier export that this one lacks (``mtp_heads.safetensors`` of an n > 1 model) are removed.
    Files and a new directory get the modes a plain ``open()`` / ``mkdir()`` gives (the umask applies;
    safetensors alone would write 0600)."""
    out = check_out_dir(out_dir)
    fresh = not out.exists()
    if fresh:
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out.parent if fresh else out))
    try:
        written = _write_files(tmp, config, tensors, tokenizer_json)
        mask = _umask()
        for name in written:
            os.chmod(tmp / name, 0o666 & ~mask)
        if fresh:
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it 0700
            os.rename(tmp, out)
        else:
            for name in set(EXPORT_FILES) - set(written):
                (out / name).unlink(missing_ok=True)
            for name in sorted(written, key=lambda n: n == "config.json"):  # config.json (the marker) last
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename of a fresh export
    return out


def export_checkpoint(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write the Llama directory for checkpoint ``ckpt`` into ``out_dir``; returns ``out_dir``. A bad
    ``out_dir`` is a :class:`UsageError` raised before the checkpoint is read."""
    check_out_dir(out_dir)
    config, tensors, tokenizer_json = checkpoint_as_llama(ckpt)
    return write_export(out_dir, config, tensors, tokenizer_json)
