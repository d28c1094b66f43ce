"""Load a model for inference from a training checkpoint (any TP x PP x DP layout) or an `mtp-export` dir.

Both sources become the same thing first: a Llama config, tensors under Llama names (heads 2..n under
``mtp_heads.<k>.``, or for anticausal heads among the layers) and the tokenizer JSON — the export format
(export.py), whose ``mtp_head_type`` says which heads the decoder builds (parallel if absent). A checkpoint
is gathered into this one process with dist_checkpointing's plain-tensor reader, so no training layout
needs to be rebuilt.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from mtp_pretrain.checkpoint import Checkpointer, CheckpointError
from mtp_pretrain.data.tokenizer import eos_id, load_tokenizer
from mtp_pretrain.determinism import warm_up_vml
from mtp_pretrain.export import MTP_FILE, MTP_PREFIX, checkpoint_as_llama
from mtp_pretrain.inference.heads import head_blocks
from mtp_pretrain.inference.model import DecoderConfig, MTPDecoder

_BLOCK = {  # StackedBlocks attribute -> the Llama tensors it is made of (concatenated along dim 0)
    "attn_norm": ["input_layernorm.weight"],
    "qkv": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "proj": ["self_attn.o_proj.weight"],
    "mlp_norm": ["post_attention_layernorm.weight"],
    "gate_up": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "down": ["mlp.down_proj.weight"],
}

_EXTRA = {  # heads' attribute (stacked over heads 2..n) -> the exported tensor below mtp_heads.<k>
    "linear": {"linear": "weight"},
    "sequential": {
        "enorm": "enorm.weight",
        "hnorm": "hnorm.weight",
        "eh_proj": "eh_proj.weight",
        "final_norm": "norm.weight",
    },
}


@dataclass
class LoadedModel:
    decoder: MTPDecoder
    tokenizer: Tokenizer
    eos: int
    source: Path  # the checkpoint or export directory read


def resolve(path: str | Path) -> Path:
    """An export dir or checkpoint as given; a run dir or its checkpoints/ dir -> its newest valid checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{p} does not exist (give a run dir, a step_XXXXXXXX checkpoint or an mtp-export dir)"
        )
    if (p / "config.json").is_file() or (p / "mtp_checkpoint.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir() and any(root.glob("step_*")):
            latest = Checkpointer(root).latest()
            if latest is None:
                raise CheckpointError(f"{root} holds no complete checkpoint")
            return latest
    raise CheckpointError(
        f"{p} is neither an mtp-export directory (config.json) nor a checkpoint (mtp_checkpoint.json) nor a run dir"
    )


def _read(source: Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    if (source / "config.json").is_file():
        config = json.loads((source / "config.json").read_text())
        tensors = load_file(str(source / "model.safetensors"))
        if (source / MTP_FILE).is_file():
            tensors.update(load_file(str(source / MTP_FILE)))
        if not (source / "tokenizer.json").is_file():
            raise CheckpointError(f"{source} has no tokenizer.json")
        return config, tensors, (source / "tokenizer.json").read_text()
    return checkpoint_as_llama(source)


def _check_tokenizer(tokenizer: str | Path, model_json: str, vocab_size: int) -> Tokenizer:
    """The user's tokenizer, if it is the one the model was trained with; else a ValueError saying so."""
    tok = load_tokenizer(tokenizer)
    model_tok = Tokenizer.from_str(model_json)
    if tok.get_vocab_size() != vocab_size or tok.get_vocab() != model_tok.get_vocab():
        raise ValueError(
            f"tokenizer {tokenizer} (vocab {tok.get_vocab_size()}) is not the one this model was trained with "
            f"(vocab {vocab_size}); omit the tokenizer to use the one stored with the model"
        )
    return tok


def _head_prefixes(cfg: DecoderConfig, trunk: int) -> list[str]:
    """Where head block i (the decoder's slot i) is in the export (export.py): head 1 after the trunk and
    heads 2..n under mtp_heads.<k>; anticausal, head i+1 is layer L-1-i (heads n..1 follow the trunk)."""
    n = cfg.mtp_heads
    if cfg.head_type == "anticausal":
        return [f"model.layers.{trunk + n - 1 - i}." for i in range(n)]
    return [f"model.layers.{trunk}."] + [f"{MTP_PREFIX}{k}." for k in range(1, head_blocks(cfg))]


def _copy_weights(model: MTPDecoder, tensors: dict[str, torch.Tensor], trunk: int) -> None:
    cfg, heads = model.cfg, model.heads
    blocks = [(b, [f"model.layers.{i}."]) for i, b in enumerate(model.trunk)]
    for block, prefixes in [*blocks, (heads.blocks, _head_prefixes(cfg, trunk))]:
        for attr, names in _BLOCK.items():
            stacked = torch.stack([torch.cat([tensors[p + name] for name in names]) for p in prefixes])
            getattr(block, attr).copy_(stacked)
    extra = [f"{MTP_PREFIX}{k}." for k in range(1, cfg.mtp_heads)]
    for attr, name in _EXTRA.get(cfg.head_type, {}).items():
        getattr(heads, attr).copy_(torch.stack([tensors[p + name] for p in extra]))
    model.embed.copy_(tensors["model.embed_tokens.weight"])
    heads.norm.copy_(tensors["model.norm.weight"])
    model.unembed.copy_(tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]))


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: str | Path | None = None,
) -> LoadedModel:
    """The decoder and tokenizer of a run dir, checkpoint or export, in ``dtype`` on ``device``."""
    warm_up_vml()  # before the RoPE tables: MKL's first vector-math call must not run split over threads
    source = resolve(path)
    config, tensors, tok_json = _read(source)
    n = int(config.get("mtp_n_heads", 1))
    head_type = config.get("mtp_head_type", "parallel") if n > 1 else "parallel"  # n = 1: a plain Llama
    layers = config["num_hidden_layers"]  # trunk + head 1 (anticausal: trunk + every head)
    trunk = layers - (n if head_type == "anticausal" else 1)
    cfg = DecoderConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        trunk_layers=trunk,
        mtp_heads=n,
        context=config["max_position_embeddings"],
        norm_eps=config["rms_norm_eps"],
        rope_base=config["rope_theta"],
        head_type=head_type,
    )
    if n == 1:
        warnings.warn(
            f"{source} has no extra MTP heads (trained with mtp.n=1): self-speculative decoding is off, "
            "generation is plain greedy/sampling",
            stacklevel=2,
        )
    model = MTPDecoder(cfg)
    with torch.no_grad():
        _copy_weights(model, tensors, trunk)
    model.to(device=device, dtype=dtype).eval()
    tok = (
        Tokenizer.from_str(tok_json)
        if tokenizer is None
        else _check_tokenizer(tokenizer, tok_json, cfg.vocab_size)
    )
    tok.encode_special_tokens = True  # as in training: special-token text inside a prompt stays text
    return LoadedModel(model, tok, eos_id(tok), source)
