"""Export a training checkpoint (any TP x PP x DP layout) as a Hugging Face transformers Llama directory.

    mtp-export outputs/tiny-n4/checkpoints/step_00000400 --out exported/

The MTP model *is* a Llama decoder when read along the next-token path: trunk blocks 1..L-n, then head 1's
block (anticausal heads: the blocks of heads n, ..., 1), the shared final norm and the shared unembedding.
So the export writes

    config.json              LlamaConfig with num_hidden_layers = L - n + 1 (anticausal: L) (+ "mtp_n_heads":
                             n, "mtp_head_type": mtp.head_type)
    model.safetensors        embed_tokens, layers 0..L-n (the last is head 1; anticausal: 0..L-1), norm,
                             lm_head
    mtp_heads.safetensors    heads 2..n, k = 1..n-1 (see below)
    tokenizer.json (+ tokenizer_config.json)   the run's tokenizer, loadable by PreTrainedTokenizerFast or
                             AutoTokenizer (transformers >= 4.45), encoding any text as the project does

How heads 2..n are exported depends on ``mtp.head_type`` (mtp_pretrain/model/heads.py defines each):

    parallel, causal   "mtp_heads.<k>.<the same Llama layer names>" (causal head k+1 reads head k's layer
                       output before the norm)
    linear             "mtp_heads.<k>.weight" [d, d]: head k+1's hidden is norm(W h), h = layer L-n-1's output
    sequential         "mtp_heads.<k>.{enorm,hnorm,eh_proj,norm}.weight" (eh_proj [d, 2d] on
                       [enorm(embedding of token t+k); hnorm(head k's normed output)], norm its own final
                       norm) + the Llama layer names of its block
    anticausal         nothing: head 1 reads head 2's layer output, ..., head n reads the trunk's, so the
                       next-token path is the trunk, then heads n, n-1, ..., 1 as Llama layers:
                       num_hidden_layers = L (layer L-k is head k), and head k's logits are layer L-k's output
                       through the shared final norm and lm_head

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

MTP_PREFIX = "mtp_heads."  # heads 2..n, kept out of the plain Llama's model.safetensors (but anticausal)
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
        # anticausal: every head is on the next-token path (see the module docstring)
        "num_hidden_layers": m.num_layers - (0 if cfg.mtp.head_type == "anticausal" else cfg.mtp.n - 1),
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
        "mtp_n_heads": cfg.mtp.n,  # extra fields: the heads beyond the first are in mtp_heads.safetensors
        "mtp_head_type": cfg.mtp.head_type,  # (or, anticausal, among the layers)
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


def _extra_head(get, prefix: str, cfg: Config) -> dict[str, torch.Tensor]:
    """Head k+1 >= 2 (``get(prefix + name)``, prefix ``heads.layers.<k>.``): its tensors as named below
    ``mtp_heads.<k>.``."""
    if cfg.mtp.head_type == "linear":
        return {"weight": get(f"{prefix}weight").contiguous().clone()}
    if cfg.mtp.head_type == "sequential":
        names = ("enorm.weight", "hnorm.weight", "eh_proj.weight")  # megatron's names, kept
        out = {name: get(prefix + name).contiguous().clone() for name in names}
        out["norm.weight"] = get(f"{prefix}final_layernorm.weight").contiguous().clone()
        return out | _layer(get, f"{prefix}transformer_layer.", cfg)
    return _layer(get, prefix, cfg)


def checkpoint_as_llama(ckpt: str | Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(Llama config, tensors, tokenizer JSON) of checkpoint ``ckpt``, gathered from any layout into this
    process. Tensors use the Llama names; heads 2..n are ``mtp_heads.<k>.<name>``, k = 1..n-1 (or, anticausal,
    Llama layers: see the module docstring)."""
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
    n = cfg.mtp.n
    # the next-token path's head layers: head 1; anticausal, heads n..1 (head i+1 reads head i+2's output)
    path = list(range(n - 1, -1, -1)) if cfg.mtp.head_type == "anticausal" else [0]
    for j, i in enumerate(path):
        for name, t in _layer(head_get, f"heads.layers.{i}.", cfg).items():
            tensors[f"model.layers.{trunk + j}.{name}"] = t
    tensors["model.embed_tokens.weight"] = plain["embedding.word_embeddings.weight"][:vocab_size].clone()
    tensors["model.norm.weight"] = plain["heads.final_layernorm.weight"].clone()
    if not cfg.model.tie_embeddings:
        tensors["lm_head.weight"] = plain["output_layer.weight"][:vocab_size].clone()
    if cfg.mtp.head_type != "anticausal":  # its heads are all on the path already
        for k in range(1, n):
            for name, t in _extra_head(head_get, f"heads.layers.{k}.", cfg).items():
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
