"""The Hydra config tree (conf/) composes into a valid Config; bad values fail early, naming the key."""

from collections import defaultdict
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from mtp_pretrain.cli import submit
from mtp_pretrain.config import (
    CONF_DIR,
    Config,
    ConfigError,
    TrainerConfig,
    ffn_hidden_size,
    register_configs,
    to_config,
    validate,
)
from tests.conftest import compose_config

DEMO = "+experiment=cpu_demo"  # the recipe `make train` runs


@pytest.fixture(scope="module")
def defaults() -> Config:
    return compose_config()


def _with(base: Config, *overrides: str) -> Config:
    """`base` with command-line style overrides, through the same merge + validation as the CLI (fast)."""
    return to_config(OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(list(overrides))))


def test_defaults_compose_to_a_valid_config():
    cfg = compose_config()
    assert isinstance(cfg, Config)
    assert cfg.model.preset == "tiny" and cfg.mtp.n == 4
    assert cfg.model.num_layers > cfg.mtp.n
    assert "${" not in cfg.trainer.run_dir  # interpolations resolved
    validate(cfg)  # idempotent: a composed config stays valid


def test_overrides_reach_the_dataclass():
    cfg = compose_config("mtp.n=2", "mtp.loss_weights=[1.0,0.5]", "trainer.steps=7", "model.seq_len=32")
    assert (cfg.mtp.n, cfg.mtp.loss_weights, cfg.trainer.steps, cfg.model.seq_len) == (2, [1.0, 0.5], 7, 32)


def test_head_weights_sum_unless_the_cpu_demo_lowers_them():
    """Without a recipe the heads are summed (the paper's rule, the dataclass default) whatever the model; the
    CPU demo weights heads 2..n 0.1 (conf/experiment/cpu_demo.yaml); any mtp.n composes; loss_weights win."""
    assert compose_config().mtp.weights() == [1.0] * 4
    assert compose_config("model=7b").mtp.extra_heads_weight == 1.0  # no demo value leaks into other models
    assert compose_config(DEMO).mtp.weights() == [1.0, 0.1, 0.1, 0.1]
    assert compose_config(DEMO, "mtp.n=2").mtp.weights() == [1.0, 0.1]
    assert compose_config(DEMO, "mtp=n1").mtp.weights() == [1.0]
    assert compose_config(DEMO, "mtp.extra_heads_weight=1.0").mtp.weights() == [1.0] * 4  # the paper's sum
    assert compose_config("mtp.n=2", "mtp.loss_weights=[1.0,0.5]").mtp.weights() == [1.0, 0.5]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["mtp.n=0"], "mtp.n"),
        (["mtp.n=-1"], "mtp.n"),
        (["model.num_layers=4"], "model.num_layers"),  # == mtp.n (4): no trunk left
        (["model.num_layers=3"], "model.num_layers"),  # < mtp.n
        (["model.hidden_size=130"], "model.num_attention_heads"),  # 130 % 4 != 0
        (["model.num_attention_heads=0"], "model.num_attention_heads"),  # must not be a ZeroDivisionError
        (["model.hidden_size=0"], "model.hidden_size"),
        (["model.num_query_groups=3"], "model.num_query_groups"),  # 4 % 3 != 0
        (["model.num_query_groups=0"], "model.num_query_groups"),  # must not be a ZeroDivisionError
        (["mtp.loss_weights=[1.0,1.0]"], "mtp.loss_weights"),  # 2 weights, n=4
        (["mtp.n=2", "mtp.loss_weights=[1.0,1.0,1.0]"], "mtp.loss_weights"),
        (["mtp.chunk_size=-1"], "mtp.chunk_size"),
        (["mtp.head_type=tree"], "mtp.head_type"),
        (["mtp.extra_heads_weight=-0.5"], "mtp.extra_heads_weight"),
        (["logging.wandb_mode=sometimes"], "logging.wandb_mode"),
        (["trainer.steps=0"], "trainer.steps"),
        (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
        (["trainer.keep_last=0"], "trainer.keep_last"),
        (["data.docs_per_shard=0"], "data.docs_per_shard"),
        (["data.on_error=ignore"], "data.on_error"),
        (["parallel.engine=fsdp"], "parallel.engine"),
        (["parallel.engine=deepspeed", "parallel.pp=2", "model.num_layers=6"], "parallel.pp"),
        (["parallel.engine=deepspeed", "parallel.zero_stage=4"], "parallel.zero_stage"),
        (["parallel.engine=deepspeed", "parallel.zero_stage=3"], "mtp.memory_efficient=false"),
        (
            ["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.offload_params=true"],
            "parallel.offload_params",
        ),
        (["parallel.engine=deepspeed", "trainer.init_from=x"], "trainer.init_from"),
        (["trainer.nonfinite=ignore"], "trainer.nonfinite"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["data.datasets=[{urls: [a.tar]}]"], "data.tokenizer"),
        (["data.datasets=[{urls: [a.tar]}]", "data.tokenizer=t.json"], "data.val_urls"),
        (["data.datasets=[{urls: [a.tar], weight: 0}]", "data.tokenizer=t.json"], "data.datasets[0].weight"),
        (["data.datasets=[{urls: []}]", "data.tokenizer=t.json"], "data.datasets[0].urls"),
    ],
)
def test_bad_values_fail_naming_the_key(defaults, overrides, key):
    _with(defaults)  # the base itself is valid: the override alone makes it fail
    with pytest.raises(ConfigError) as err:
        _with(defaults, *overrides)
    message = str(err.value)
    assert key in message
    assert "\n" not in message  # one line, as the CLI prints it


@pytest.mark.parametrize(
    ("override", "key"),
    [("mtp.n=0", "mtp.n"), ("model.num_layers=4", "model.num_layers"), ("trainer.steps=0", "trainer.steps")],
)
def test_bad_values_fail_through_hydra_compose(override, key):
    with pytest.raises(ConfigError, match=key):
        compose_config(override)


def test_unknown_preset_fails_in_compose_naming_it():
    with pytest.raises(HydraException) as err:
        compose_config("model=nope")
    assert "model/nope" in str(err.value)


def test_unknown_key_fails_in_compose_naming_it():
    with pytest.raises(HydraException) as err:
        compose_config("model.nope=1")
    assert "model.nope" in str(err.value)


def test_unknown_key_in_a_plain_dict_is_rejected():
    with pytest.raises(Exception, match="nope"):
        to_config(
            {
                "model": {
                    "preset": "x",
                    "num_layers": 3,
                    "hidden_size": 8,
                    "num_attention_heads": 2,
                    "seq_len": 4,
                    "nope": 1,
                }
            }
        )


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_preset_files_are_the_expected_ones():
    assert set(_presets("model")) >= {"1b", "7b", "small", "tiny"}
    assert set(_presets("mtp")) >= {"n1", "n2", "n4", "n8"}


@pytest.mark.parametrize("preset", _presets("model"))
def test_every_model_preset_composes_and_validates(preset):
    cfg = compose_config(f"model={preset}")
    assert cfg.model.preset == preset
    assert cfg.model.hidden_size % cfg.model.num_attention_heads == 0
    assert ffn_hidden_size(cfg.model) % 64 == 0
    assert "${" not in cfg.trainer.run_dir


@pytest.mark.parametrize("group", _presets("mtp"))
def test_every_mtp_preset_composes(group):
    n = int(group[1:])
    cfg = compose_config(f"mtp={group}", f"model.num_layers={n + 2}")  # the trunk keeps 2 blocks
    assert cfg.mtp.n == n
    with pytest.raises(ConfigError, match="model.num_layers"):  # and no trunk at all is rejected
        compose_config(f"mtp={group}", f"model.num_layers={n}")


# `make train`'s whole config before run recipes existed (conf/train.yaml alone, commit 5d283f6), resolved.
OLD_MAKE_TRAIN = """
model: {preset: tiny, num_layers: 6, hidden_size: 128, num_attention_heads: 4, num_query_groups: null,
        ffn_hidden_size: null, seq_len: 128, rotary_base: 10000, norm_eps: 1.0e-05, init_std: 0.02,
        tie_embeddings: false, dropout: 0.0}
mtp: {'n': 4, loss_weights: null, extra_heads_weight: 0.1, memory_efficient: true, chunk_size: 0}
data: {source: null, cache_dir: .cache/data, vocab_size: 1024, val_shards: 1, docs_per_shard: 64,
       datasets: [], val_urls: [], tokenizer: null, text_field: text, num_workers: 1,
       mask_doc_boundaries: false, on_error: skip}
optim: {lr: 0.003, min_lr: 0.0003, weight_decay: 0.1, beta1: 0.9, beta2: 0.95, eps: 1.0e-08, warmup_steps: 30,
        clip_grad: 1.0}
parallel: {engine: megatron, tp: 1, pp: 1, vpp: null, overlap_grad_reduce: true, first_stage_layers: null,
           last_stage_layers: null, zero_stage: 1, offload_optimizer: false, offload_params: false,
           deepspeed_config: null}
trainer: {steps: 400, micro_batch_size: 16, grad_accum: 1, seed: 1234, bf16: false, recompute: false,
          val_every: 100, val_batches: 4, save_every: 100, keep_last: 2, run_dir: outputs/tiny-n4,
          resume: auto, init_from: null, nonfinite: skip, stop_file: STOP}
logging: {wandb_mode: offline, wandb_project: mtp-pretrain, wandb_entity: null, run_name: null, log_every: 10,
          plot: true}
"""


def test_cpu_demo_recipe_is_the_old_make_train_config():
    """Every key `make train` had keeps its value (keys added to the dataclasses since are not compared)."""
    old = OmegaConf.to_container(OmegaConf.create(OLD_MAKE_TRAIN))
    new = OmegaConf.to_container(OmegaConf.structured(compose_config(DEMO)))
    assert {group: {k: new[group][k] for k in keys} for group, keys in old.items()} == old


def test_the_command_line_beats_the_recipe():
    """`make train ARGS="model=small mtp=n1 ..."`: group choices and values given after the recipe win."""
    cfg = compose_config(DEMO, "model=small", "mtp=n1", "trainer.steps=1000")
    assert (cfg.model.preset, cfg.mtp.n, cfg.trainer.steps, cfg.trainer.micro_batch_size) == (
        "small",
        1,
        1000,
        16,
    )


def test_without_a_recipe_the_defaults_apply():
    """`mtp-train` alone: the default presets over the dataclass defaults (no demo trainer/vocab/weights)."""
    cfg = compose_config()
    assert (cfg.model.preset, cfg.mtp.n, cfg.trainer) == ("tiny", 4, TrainerConfig(run_dir="outputs/tiny-n4"))
    assert cfg.data.vocab_size == 4096 and cfg.mtp.extra_heads_weight == 1.0


def test_train_yaml_only_chooses_presets():
    """A value at the root of train.yaml would override every preset and recipe (the old 0.1 did)."""
    assert set(OmegaConf.load(Path(CONF_DIR) / "train.yaml")) == {"defaults", "hydra"}


def test_paper_7b_recipe():
    cfg = compose_config("+experiment=paper_7b")
    assert (cfg.model.preset, cfg.mtp.weights(), cfg.trainer.bf16) == ("7b", [1.0] * 4, True)
    p, t = cfg.parallel, cfg.trainer
    dp = 32 // (p.tp * p.pp)  # the layout its comment sizes the batch for: 32 GPUs
    assert t.micro_batch_size * t.grad_accum * dp * cfg.model.seq_len == 1024 * 4096  # 4M tokens per step


def _all_presets() -> list[tuple[str, str]]:
    return sorted((p.parent.name, p.stem) for p in Path(CONF_DIR).glob("*/*.yaml"))


def test_no_two_groups_share_a_preset_name():
    groups = defaultdict(list)
    for group, preset in _all_presets():
        groups[preset].append(group)
    assert {preset: g for preset, g in groups.items() if len(g) > 1} == {}


def test_only_recipes_write_outside_their_group():
    """Group presets hold their group's keys only; `# @package _global_` is for conf/experiment/."""
    for group, preset in _all_presets():
        text = (Path(CONF_DIR) / group / f"{preset}.yaml").read_text()
        assert ("@package _global_" in text) == (group == "experiment"), f"{group}/{preset}"


@pytest.mark.parametrize(("group", "preset"), _all_presets())
def test_every_preset_in_every_group_composes_and_validates(group, preset, tmp_path):
    if group == "slurm":  # mtp-submit's own group (conf/submit.yaml): the request it composes writes a script
        submit(["--dry-run", f"slurm={preset}", f"trainer.run_dir={tmp_path}"])
        assert (tmp_path / "slurm" / "job.sbatch").is_file()
        return
    if group == "experiment":
        overrides = [f"+experiment={preset}"]
    elif group == "mtp":  # n heads need a trunk: L = n + 2 blocks
        overrides = [f"mtp={preset}", f"model.num_layers={int(preset[1:]) + 2}"]
    else:
        overrides = [f"{group}={preset}"]
    cfg = compose_config(*overrides)  # to_config validates
    assert "${" not in cfg.trainer.run_dir


def test_a_recipe_may_carry_a_sweep(tmp_path):
    """A recipe's `hydra:` block (e.g. hydra.sweeper.params for `mtp-train -m`) composes with its run keys."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "heads_sweep.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /experiment/cpu_demo\n  - _self_\n"
        "trainer:\n  steps: 3\nhydra:\n  sweeper:\n    params:\n      mtp.n: 1,2,4\n"
    )
    overrides = ["+experiment=heads_sweep", f"hydra.searchpath=[file://{tmp_path}]"]
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        raw = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    assert raw.hydra.sweeper.params == {"mtp.n": "1,2,4"}
    cfg = compose_config(*overrides)
    assert cfg.trainer.steps == 3 and cfg.mtp.extra_heads_weight == 0.1  # over the recipe it extends


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["parallel.tp=3"], "num_attention_heads"),
        (["parallel.tp=2", "model.num_query_groups=1"], "num_query_groups"),
        (["parallel.pp=3"], "parallel.pp"),
        (["parallel.tp=0"], "parallel.tp"),
        (["parallel.engine=nope"], "parallel.engine"),
    ],
)
def test_parallel_layout_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(*overrides)


def test_world_size_not_divisible_by_tp_pp():
    from mtp_pretrain.parallel import Layout

    with pytest.raises(ValueError, match="not divisible by parallel.tp"):
        Layout(world_size=3, tp=2, pp=1)
    assert Layout(world_size=8, tp=2, pp=2).dp == 2


def test_uneven_pipeline_split():
    cfg = compose_config("model.num_layers=9", "mtp.n=4", "parallel.pp=2", "parallel.first_stage_layers=3")
    assert cfg.parallel.first_stage_layers == 3  # 5 trunk layers: 3 + 2
    with pytest.raises(ConfigError, match="first/last stage layers 4/None"):
        compose_config("model.num_layers=9", "mtp.n=4", "parallel.pp=3", "parallel.first_stage_layers=4")
    with pytest.raises(ConfigError, match=r"need parallel\.pp > 1"):
        compose_config("parallel.first_stage_layers=1")


def test_interleaved_schedule_validation():
    cfg = compose_config(
        "mtp=n1", "model.num_layers=5", "parallel.pp=2", "parallel.vpp=2", "trainer.grad_accum=2"
    )
    assert cfg.parallel.vpp == 2  # 4 trunk layers = 2 stages x 2 chunks
    with pytest.raises(ConfigError, match=r"parallel\.vpp=2 .* needs parallel\.pp > 1"):
        compose_config("parallel.vpp=2")
    with pytest.raises(ConfigError, match=r"trainer\.grad_accum=1 must be a multiple of parallel\.pp=2"):
        compose_config("mtp=n1", "model.num_layers=5", "parallel.pp=2", "parallel.vpp=2")
    with pytest.raises(ConfigError, match="do not split into"):
        compose_config("parallel.pp=2", "parallel.vpp=2", "trainer.grad_accum=2")  # n=4: 2 trunk layers
