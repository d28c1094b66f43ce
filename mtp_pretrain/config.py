"""Structured configuration: dataclasses registered in Hydra's ConfigStore, validated once at start-up.

The YAML files under conf/ fill these; a typo in a key is rejected by Hydra's structured-config check, and
`validate()` rejects bad combinations with one line that names the key and the fix.

One source of truth per value: the dataclass fields below hold the defaults; a preset (conf/<group>/*.yaml)
lists only the keys it sets (those that differ from the defaults, plus the ones its name stands for, such
as `mtp=n4`'s n); conf/train.yaml only chooses presets; a run recipe (conf/experiment/*.yaml, composed
with `+experiment=NAME`) sets what one run needs across groups. Where a preset keeps a value other than
the default, its comment says why.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mtp_pretrain.errors import UsageError
from mtp_pretrain.slurm import (  # mtp-submit's schema: slurm.py imports nothing of ours
    SlurmConfig,
    SubmitConfig,
)

# The presets live in conf/ at the repo root; mtp_pretrain/conf links there so that the wheel carries them
# as package data (pyproject.toml): one path serves a checkout (editable install) and an installed wheel.
CONF_DIR = str((Path(__file__).resolve().parent / "conf").resolve())


class ConfigError(UsageError):
    """A bad configuration value or combination; the message names the key and how to fix it."""


ATTENTION_BACKENDS = ("auto", "sdpa", "local", "te")  # model.attention
# mtp.head_type: what heads 2..n are and what they read (mtp_pretrain/model/heads.py describes each)
HEAD_TYPES = ("parallel", "linear", "causal", "anticausal", "sequential")
WEIGHT_SCHEDULES = (
    "constant",
    "step",
    "linear",
    "forward",
    "reverse",
)  # mtp.weight_schedule (weight_schedule.py)
TE_MISSING = (
    "model.attention=te: transformer_engine does not import here; install Transformer Engine "
    "(pip install transformer-engine[pytorch]) or use model.attention=auto (sdpa without it)"
)


@dataclass
class ModelConfig:
    preset: str = MISSING  # name of the conf/model/*.yaml preset, for the record
    num_layers: int = MISSING  # L: total transformer blocks = trunk (L - n) + n heads, as the reference
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: int | None = None  # GQA; None = multi-head attention
    ffn_hidden_size: int | None = None  # None: Llama's 8/3 * hidden, rounded up to a multiple of 64
    seq_len: int = MISSING  # T: input positions per sample (each sample holds T + n tokens)
    rotary_base: int = 10000
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    dropout: float = 0.0
    # Core attention of every block (trunk and heads), see mtp_pretrain/model/attention.py: sdpa = torch's
    # fused scaled_dot_product_attention (never materialises the T x T scores), local = megatron's unfused
    # DotProductAttention, te = Transformer Engine's layer spec; auto = te where it imports, else sdpa.
    # sdpa and local hold no weights: their checkpoints are interchangeable.
    attention: str = "auto"


@dataclass
class MTPConfig:
    n: int = 4  # number of heads; n = 1 is plain next-token training
    # parallel (Gloeckle et al.: a block per head on the trunk output) | linear (heads 2..n one d x d linear) |
    # causal (head k a block on head k-1's output) | anticausal (head n on the trunk, head k on head k+1's) |
    # sequential (DeepSeek-V3's MTP modules: head k-1's output + the embedding of token t+k-1). Head 1 is
    # always one block + the shared final norm and unembedding (mtp_pretrain/model/heads.py)
    head_type: str = "parallel"
    loss_weights: list[float] | None = None  # per-head weights; None = [1, w, ..., w], w = extra_heads_weight
    # Weight of heads 2..n relative to head 1 when loss_weights is not given. The paper sums the heads
    # (1.0); DeepSeek-V3 (megatron's mtp_loss_scaling_factor) uses 0.1-0.3. Small models need it low:
    # see conf/experiment/cpu_demo.yaml.
    extra_heads_weight: float = 1.0
    memory_efficient: bool = True  # per-head forward/backward on the detached trunk output
    chunk_size: int = 0  # > 0: unembedding + CE in sequence chunks of this length
    # Chained head types (causal, anticausal, sequential): true keeps one head's activations at a time and
    # re-runs each head's forward in the backward; false keeps every head's (more memory, no second forward)
    chain_recompute: bool = True
    # Each head's CE divided by: "global" = its valid targets over the whole optimizer step (all micro-batches,
    # all DP ranks; the gradient does not depend on the layout), or "micro_batch" = the micro-batch's own
    # count, then averaged over micro-batches and ranks (the behaviour before; Megatron-LM's default)
    loss_normalization: str = "global"
    # Loss weights over training (mtp_pretrain/weight_schedule.py states each rule and its source): constant
    # (weights() throughout) | step (DeepSeek-V3: heads 2..n weigh weight_start, then weight_end from
    # weight_switch_at of the training tokens) | linear (weight_start -> weight_end over training) | forward /
    # reverse (Aynetdinov & Akbik 2025: heads 2..n switched on / off one after another over curriculum_fraction)
    weight_schedule: str = "constant"
    weight_start: float = 0.3  # step, linear: heads 2..n's weight at the start (DeepSeek-V3's first lambda)
    weight_end: float = 0.1  # step: after the switch; linear: at the end (DeepSeek-V3's second lambda)
    weight_switch_at: float = (
        0.676  # step: fraction of training; DeepSeek-V3 switched after 10T of 14.8T tokens
    )
    curriculum_fraction: float = 1.0  # forward, reverse: the heads switch over this fraction of training

    def weights(self) -> list[float]:
        """The loss weight of every head."""
        if self.loss_weights is not None:
            return list(self.loss_weights)
        return [1.0] + [self.extra_heads_weight] * (self.n - 1)


@dataclass
class DatasetConfig:
    """One dataset of a training mix: pre-built shards (see mtp-make-shards)."""

    urls: list[str] = (
        MISSING  # files, directories, brace patterns (shard-{000000..000099}.tar), pipe: commands
    )
    weight: float = 1.0  # share of the training samples (normalised over the mix)
    name: str = "data"


@dataclass
class DataConfig:
    # Either a corpus built once from sources (default: the Python stdlib) ...
    source: list[str] | None = None  # directories / .txt / .jsonl files; None = the Python stdlib
    cache_dir: str = ".cache/data"  # tokenizer + shards are built here once and reused
    vocab_size: int = 4096  # tokenizer vocabulary trained offline (the CPU demo's 1024: cpu_demo.yaml)
    val_shards: int = 1  # last shards held out for validation
    docs_per_shard: int = 64  # ~11 shards for the stdlib: a validation shard, and one per DP rank
    # ... or pre-built shards (these replace the built corpus when set)
    datasets: list[DatasetConfig] = field(default_factory=list)  # weighted mix of training datasets
    val_urls: list[str] = field(default_factory=list)  # validation shards of the pre-built datasets
    tokenizer: str | None = None  # tokenizer.json the pre-built shards were made with
    text_field: str = "text"  # text field of .json members (shards written by other tools)
    num_workers: int = 1  # DataLoader workers per rank (0 = read in the training process)
    mask_doc_boundaries: bool = False  # drop targets that lie in another document than their input token
    on_error: str = "skip"  # bad shard / sample: skip (count + warn) or raise


@dataclass
class OptimConfig:
    # mtp-train's schedule comes from conf/optim/adamw.yaml (tuned on the small presets); these defaults
    # serve code that builds an OptimConfig directly (benchmarks, tests).
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    clip_grad: float = 1.0  # 0 disables clipping


@dataclass
class ParallelConfig:
    engine: str = (
        "megatron"  # megatron (DDP + DistributedOptimizer, any TP x PP x DP) | deepspeed (ZeRO, PP=1)
    )
    tp: int = 1  # tensor parallel: splits attention heads, FFN and the vocabulary
    pp: int = 1  # pipeline stages: stage 0 holds the embedding, the last one the n heads
    vpp: int | None = None  # virtual stages (model chunks) per pipeline rank: interleaved 1F1B when > 1
    overlap_grad_reduce: bool = True  # megatron DDP: reduce gradient buckets while backward runs
    # Uneven pipeline split: trunk layers on the first / last stage (the rest share the middle stages
    # evenly). The last stage also runs the n head blocks and n unembeddings: give it fewer trunk layers.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    # engine=deepspeed only
    # 0-3: shard optimizer state (1), + gradients (2), + parameters (3); the parallel=deepspeed preset picks 2
    zero_stage: int = 1
    offload_optimizer: bool = False  # optimizer state and step on the CPU (torch AdamW: nothing to compile)
    offload_params: bool = False  # parameters on the CPU between uses (ZeRO-3)
    deepspeed_config: str | None = None  # a DeepSpeed JSON file merged over the generated config


@dataclass
class TrainerConfig:
    steps: int = 300  # optimizer steps
    micro_batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step (per data-parallel rank)
    seed: int = 1234
    bf16: bool = False
    recompute: bool = False  # full activation recompute of the trunk layers
    val_every: int = 100  # 0 disables periodic validation
    val_batches: int = 4
    save_every: int = 100  # 0: save only at the end
    keep_last: int = 2
    run_dir: str = "outputs/${model.preset}-n${mtp.n}"
    resume: str = "auto"  # auto | none | a checkpoint directory
    # A checkpoint whose model weights start this run (step 0, new optimizer), e.g. an n=4 model finetuned
    # with n=1: the trunk must match; heads 1..min(n, n_ckpt) are taken, extra heads start fresh.
    init_from: str | None = None
    nonfinite: str = "skip"  # NaN/inf loss: skip (drop the update, count it) or abort (exit, no save)
    stop_file: str = "STOP"  # <run_dir>/STOP appearing = save and exit like SIGTERM/SIGUSR1; "" disables
    # bit-identical reruns on the same hardware and thread count (torch deterministic algorithms, MKL/cuBLAS
    # settings; see docs/architecture.md "Determinism"), at a measured cost in speed
    deterministic: bool = False
    # what a checkpoint's manifest hashes: "all" files, or "parsed" = only the files the trainer itself
    # parses (trainer.pt, rank_*.pt, metadata); large tensor shards are then checked by size only
    checkpoint_checksum: str = "all"


@dataclass
class LoggingConfig:
    """The ``logging`` group: where metrics go and how often."""

    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "mtp-pretrain"
    wandb_entity: str | None = None
    run_name: str | None = None
    log_every: int = 10  # console line / wandb point every k steps
    plot: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    """The schemas of conf/train.yaml (root ``base_config``, one ``base_<group>`` per group) and of
    mtp-submit's conf/submit.yaml (root ``base_submit``, the ``slurm`` group)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(name="base_submit", node=SubmitConfig)
    for group, node in [
        ("model", ModelConfig),
        ("mtp", MTPConfig),
        ("data", DataConfig),
        ("optim", OptimConfig),
        ("parallel", ParallelConfig),
        ("trainer", TrainerConfig),
        ("logging", LoggingConfig),
        ("slurm", SlurmConfig),
    ]:
        cs.store(group=group, name=f"base_{group}", node=node)


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """conf/<config_name>.yaml composed by Hydra with ``overrides``, as the entry points compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def compose_train_config(overrides: Sequence[str] = ()) -> Config:
    """The validated training config of ``mtp-train OVERRIDES`` (raises ConfigError / Hydra's errors)."""
    return to_config(compose(overrides))


def ffn_hidden_size(m: ModelConfig) -> int:
    if m.ffn_hidden_size:
        return m.ffn_hidden_size
    return -(-(8 * m.hidden_size // 3) // 64) * 64


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Reject bad values and combinations before anything is built; one line, naming key and fix."""
    m, mtp, t, o = cfg.model, cfg.mtp, cfg.trainer, cfg.optim
    _require(mtp.n >= 1, f"mtp.n={mtp.n}: the number of heads must be >= 1 (n=1 is next-token training)")
    _require(
        m.num_layers > mtp.n,
        f"model.num_layers={m.num_layers} must exceed mtp.n={mtp.n}: the trunk has L-n blocks and the heads "
        f"n; raise model.num_layers or lower mtp.n",
    )
    _require(
        m.hidden_size >= 1 and m.num_attention_heads >= 1,
        f"model.hidden_size={m.hidden_size} and model.num_attention_heads={m.num_attention_heads} must be >= 1",
    )
    _require(
        m.hidden_size % m.num_attention_heads == 0,
        f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
        f"{m.num_attention_heads}; pick a head count that divides it",
    )
    if m.num_query_groups is not None:
        _require(
            m.num_query_groups >= 1 and m.num_attention_heads % m.num_query_groups == 0,
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.num_query_groups}",
        )
    _require(
        m.attention in ATTENTION_BACKENDS,
        f"model.attention={m.attention!r}: use one of {', '.join(ATTENTION_BACKENDS)}",
    )
    # a cheap look-up (no import of torch): the model factory imports it and reports the same line if it fails
    _require(m.attention != "te" or importlib.util.find_spec("transformer_engine") is not None, TE_MISSING)
    if mtp.loss_weights is not None:
        _require(
            len(mtp.loss_weights) == mtp.n,
            f"mtp.loss_weights has {len(mtp.loss_weights)} entries but mtp.n={mtp.n}; give one weight per head",
        )
        _require(all(w >= 0 for w in mtp.loss_weights), "mtp.loss_weights must be >= 0")
    _require(mtp.extra_heads_weight >= 0, f"mtp.extra_heads_weight={mtp.extra_heads_weight} must be >= 0")
    _require(
        mtp.head_type in HEAD_TYPES,
        f"mtp.head_type={mtp.head_type!r}: use one of {', '.join(HEAD_TYPES)}",
    )
    _require(
        mtp.loss_normalization in ("global", "micro_batch"),
        f"mtp.loss_normalization={mtp.loss_normalization!r}: use global (one denominator per head for the whole "
        "optimizer step) or micro_batch (each micro-batch's own mean)",
    )
    _require(
        mtp.weight_schedule in WEIGHT_SCHEDULES,
        f"mtp.weight_schedule={mtp.weight_schedule!r}: use one of {', '.join(WEIGHT_SCHEDULES)}",
    )
    if mtp.weight_schedule in ("step", "linear"):
        _require(
            mtp.loss_weights is None,
            f"mtp.loss_weights is set but mtp.weight_schedule={mtp.weight_schedule} sets heads 2..n's weight from "
            "mtp.weight_start/weight_end: drop mtp.loss_weights (head 1 then weighs 1) or use constant/forward/reverse",
        )
        for key, value in [("mtp.weight_start", mtp.weight_start), ("mtp.weight_end", mtp.weight_end)]:
            _require(value >= 0, f"{key}={value} must be >= 0 (the loss weight of heads 2..n)")
    _require(
        0 <= mtp.weight_switch_at <= 1,
        f"mtp.weight_switch_at={mtp.weight_switch_at} must be a fraction of training in [0, 1] (0.676: DeepSeek-V3)",
    )
    _require(
        0 < mtp.curriculum_fraction <= 1,
        f"mtp.curriculum_fraction={mtp.curriculum_fraction} must be a fraction of training in (0, 1]",
    )
    _require(mtp.chunk_size >= 0, f"mtp.chunk_size={mtp.chunk_size} must be >= 0 (0 = no chunking)")
    _require(m.seq_len >= 1, f"model.seq_len={m.seq_len} must be >= 1")
    for key, value in [
        ("trainer.steps", t.steps),
        ("trainer.micro_batch_size", t.micro_batch_size),
        ("trainer.grad_accum", t.grad_accum),
    ]:
        _require(value >= 1, f"{key}={value} must be >= 1")
    _require(t.val_batches >= 1 or t.val_every == 0, "trainer.val_batches must be >= 1 when validating")
    _require(t.nonfinite in ("skip", "abort"), f"trainer.nonfinite={t.nonfinite!r}: use skip or abort")
    _require(
        t.checkpoint_checksum in ("all", "parsed"),
        f"trainer.checkpoint_checksum={t.checkpoint_checksum!r}: use all (hash every file) or parsed "
        "(hash the files the trainer parses, size-check the tensor shards)",
    )
    _require(t.keep_last >= 1, f"trainer.keep_last={t.keep_last} must be >= 1 (the latest is always kept)")
    _require(
        o.lr > 0 and 0 <= o.min_lr <= o.lr,
        f"optim.lr={o.lr} / optim.min_lr={o.min_lr}: need 0 <= min_lr <= lr, lr > 0",
    )
    _require(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _require(
        cfg.logging.wandb_mode in ("offline", "online", "disabled"),
        f"logging.wandb_mode={cfg.logging.wandb_mode!r}: use offline, online or disabled",
    )
    p = cfg.parallel
    _require(
        p.engine in ("megatron", "deepspeed"), f"parallel.engine={p.engine!r}: use megatron or deepspeed"
    )
    if p.engine == "deepspeed":
        _require(
            p.pp == 1 and not p.vpp,
            f"parallel.engine=deepspeed runs PP=1 (got parallel.pp={p.pp}); "
            "use parallel.engine=megatron for pipeline parallelism",
        )
        _require(0 <= p.zero_stage <= 3, f"parallel.zero_stage={p.zero_stage}: use 0, 1, 2 or 3")
        _require(
            not p.offload_params or p.zero_stage == 3, "parallel.offload_params needs parallel.zero_stage=3"
        )
        _require(
            not p.offload_optimizer or p.zero_stage >= 1,
            "parallel.offload_optimizer needs parallel.zero_stage >= 1",
        )
        _require(
            not t.init_from,
            "trainer.init_from with parallel.engine=deepspeed: start the finetune with parallel.engine=megatron "
            "(its first checkpoint then resumes under either engine's layout rules)",
        )
        _require(
            p.zero_stage < 3 or not mtp.memory_efficient,
            "parallel.zero_stage=3 needs mtp.memory_efficient=false: ZeRO-3 gathers parameters only inside its module "
            "hooks, which the per-head backward of the memory-efficient loss runs outside of (or use zero_stage<=2)",
        )
    _require(p.tp >= 1 and p.pp >= 1, f"parallel.tp={p.tp} and parallel.pp={p.pp} must be >= 1")
    _require(
        m.num_attention_heads % p.tp == 0,
        f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}",
    )
    _require(
        (m.num_query_groups or m.num_attention_heads) % p.tp == 0,
        f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tp={p.tp}",
    )
    _require(
        ffn_hidden_size(m) % p.tp == 0,
        f"FFN size {ffn_hidden_size(m)} (model.ffn_hidden_size) is not divisible by parallel.tp={p.tp}",
    )
    trunk = m.num_layers - mtp.n
    uneven = [x for x in (p.first_stage_layers, p.last_stage_layers) if x is not None]
    _require(
        not uneven or p.pp > 1,
        "parallel.first_stage_layers / last_stage_layers need parallel.pp > 1",
    )
    _require(all(x >= 1 for x in uneven), "parallel.first_stage_layers / last_stage_layers must be >= 1")
    middle_stages, middle_layers = p.pp - len(uneven), trunk - sum(uneven)
    _require(
        middle_layers >= 0
        and (middle_layers == 0 if middle_stages == 0 else middle_layers % middle_stages == 0),
        f"the trunk's {trunk} layers (model.num_layers - mtp.n) do not split over parallel.pp={p.pp} stages"
        + (f" with first/last stage layers {p.first_stage_layers}/{p.last_stage_layers}" if uneven else "")
        + "; change model.num_layers, mtp.n, parallel.pp or the per-stage layer counts",
    )
    if p.vpp is not None and p.vpp > 1:
        _require(p.pp > 1, f"parallel.vpp={p.vpp} (interleaved schedule) needs parallel.pp > 1")
        _require(not uneven, "parallel.vpp > 1 cannot be combined with first/last_stage_layers")
        _require(
            trunk % (p.pp * p.vpp) == 0,
            f"the trunk's {trunk} layers do not split into parallel.pp*parallel.vpp={p.pp * p.vpp} chunks",
        )
        _require(
            t.grad_accum % p.pp == 0,
            f"trainer.grad_accum={t.grad_accum} must be a multiple of parallel.pp={p.pp} for the interleaved "
            f"schedule (megatron runs micro-batches in groups of pp per virtual stage)",
        )
    _validate_data(cfg.data, t)


def _validate_data(d: DataConfig, t: TrainerConfig) -> None:
    _require(d.on_error in ("skip", "raise"), f"data.on_error={d.on_error!r}: use skip or raise")
    _require(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0 (0 = no worker processes)")
    if d.datasets:
        _require(
            d.tokenizer is not None,
            "data.datasets needs data.tokenizer: the tokenizer.json the shards were made with",
        )
        for i, ds in enumerate(d.datasets):
            _require(
                bool(ds.urls), f"data.datasets[{i}].urls is empty: give shard files, a directory or a pattern"
            )
            _require(ds.weight > 0, f"data.datasets[{i}].weight={ds.weight} must be > 0")
        _require(
            bool(d.val_urls) or t.val_every == 0,
            "data.val_urls is empty: give held-out shards for validation, or set trainer.val_every=0",
        )
        return
    _require(d.val_shards >= 1, "data.val_shards must be >= 1 (validation needs held-out shards)")
    _require(d.vocab_size >= 256 + 2, "data.vocab_size must be >= 258 (byte alphabet + EOS + PAD)")
    _require(d.docs_per_shard >= 1, f"data.docs_per_shard={d.docs_per_shard} must be >= 1")


def from_yaml(text: str) -> Config:
    """A Config saved with ``OmegaConf.to_yaml`` (a checkpoint's), read back without re-validating it."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text)))  # type: ignore[return-value]


def _unknown_keys(raw: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of ``raw`` that the dataclass ``schema`` lacks, dotted (``+model.typo=1`` adds one silently:
    OmegaConf's merge into a structured config keeps keys that Hydra appended)."""
    if not isinstance(raw, (dict, DictConfig)):
        return []
    hints = typing.get_type_hints(schema)
    unknown = []
    for key in raw:
        if key == "hydra" and not prefix:
            continue
        if key not in hints:
            unknown.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]):
            unknown += _unknown_keys(raw[key], hints[key], f"{prefix}{key}.")
    return unknown


def to_config(raw: Any) -> Config:
    """A DictConfig from Hydra (or a plain dict) -> validated Config dataclass."""
    unknown = _unknown_keys(raw, Config)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}: check the spelling (mtp-train --cfg job lists every key)"
        )
    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), raw))  # type: ignore[assignment]
    validate(cfg)
    return cfg
