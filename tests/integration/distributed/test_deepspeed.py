"""DeepSpeed engine parity: ZeRO 1/2/3 (2 ranks) and TP2 x DP2 (4 ranks), grad accumulation 1 and 2, give the
single-process run's per-head losses and parameters (fp32), and ZeRO-3 on very uneven valid targets its
gradients (mtp.loss_normalization=global). One torchrun launch per world size."""

import pytest
import torch
from megatron.core import dist_checkpointing

from tests.integration.distributed import deepspeed_parity as script
from tests.integration.distributed import layout_parity
from tests.integration.distributed.parity import (
    assert_step_gradients_equal,
    compare_to_reference,
    launch_all,
    load_run,
)

LAUNCHES = {
    2: ["1,1", "1,2", "2,1", "2,2", "3,1", "3,2", "3,2,masked", "3,2,masked,types"],
    4: ["1,2,tp2", "2,1,tp2"],
}


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    return launch_all(tmp_path_factory.mktemp("deepspeed"), "deepspeed_parity.py", LAUNCHES)


def test_every_zero_stage_matches_one_process(dist_world, ds_runs):
    names = sorted(p.stem for p in ds_runs.glob("zero*.json"))
    assert len(names) == 8, names
    references = {}
    worst_rel, worst_param = 0.0, 0.0
    for name in names:
        ga, dp = int(name.split("-ga")[1].split("-")[0]), int(name.split("dp")[1])
        if ga * dp not in references:
            history, engine = layout_parity.run(script.N, tp=1, pp=1, dp=1, ga=ga * dp)
            params = {
                k: v.detach().clone()
                for k, v in engine.module.state_dict().items()
                if "_extra_state" not in k
            }
            references[ga * dp] = history, params, engine
        ref_history, ref_params, ref_engine = references[ga * dp]
        history, loaded = load_run(ds_runs, name, ref_engine.module)
        worst = compare_to_reference(name, history, ref_history, loaded, ref_params, layout_parity.OPTIM.lr)
        worst_rel, worst_param = max(worst_rel, worst[0]), max(worst_param, worst[1])
    print(
        f"deepspeed vs one process: worst loss / grad norm difference {worst_rel:.1f} eps (relative), "
        f"worst param diff {worst_param:.2e}"
    )


def test_deepspeed_checkpoint_resumes_on_another_dp_size_through_universal(dist_world, ds_runs):
    """The ZeRO-2 DP2 engine checkpoint on one process: converted automatically, weights and Adam state
    restored exactly (parameters bit-identical to that run's final ones), and training continues."""
    from mtp_pretrain.build import build_model
    from mtp_pretrain.config import MTPConfig, ParallelConfig
    from mtp_pretrain.engine.deepspeed import DeepSpeedEngine
    from mtp_pretrain.model.mtp_model import transformer_config

    name = "zero2-ga1-tp1dp2"
    cfg, mtp = layout_parity.model_cfg(script.N), MTPConfig(n=script.N)
    model = build_model(cfg, mtp, layout_parity.VOCAB, transformer_config(cfg, mtp), seed=7)  # other weights
    engine = DeepSpeedEngine(
        model, layout_parity.OPTIM, 10, ParallelConfig(engine="deepspeed", zero_stage=2), 2, 1
    )
    engine.load(ds_runs / f"{name}-engine")
    assert (ds_runs / f".tmp-universal-{name}-engine").is_dir()  # converted beside it, never inside it
    want = dist_checkpointing.load({"model": engine.module.sharded_state_dict()}, str(ds_runs / name))[
        "model"
    ]
    got = {k: v for k, v in engine.module.state_dict().items() if "_extra_state" not in k}
    for key, value in got.items():
        assert torch.equal(value, want[key]), key
    tokens = layout_parity.global_batch(99, script.N, 2)
    result = engine.train_step(iter([(tokens, torch.ones_like(tokens, dtype=torch.bool))]), 1, cfg.seq_len, 2)
    assert result.loss == result.loss and result.grad_norm > 0


def test_zero3_on_uneven_valid_targets_gives_one_process_gradients(dist_world, ds_runs):
    """ZeRO-3 (the naive loss), DP2 x grad accumulation 2 on layout_parity's masked batches (valid targets
    spread very unevenly over the ranks' micro-batches), mtp.loss_normalization=global: the first step's
    reduced gradients, and the losses, gradient norms and final parameters over the run, are those of the
    single-process megatron engine on the concatenated batch (test_layouts.py shows micro_batch differs)."""
    name = "masked-zero3-ga2-tp1dp2"
    history, grads, params, engine = layout_parity.masked_reference()
    got = torch.load(ds_runs / f"{name}-grads.pt", weights_only=True)
    worst = assert_step_gradients_equal(got, grads, name)
    run_history, loaded = load_run(ds_runs, name, engine.module)
    compare_to_reference(name, run_history, history, loaded, params, layout_parity.OPTIM.lr)
    print(f"{name}: gradients within {worst:.1e} of one process")


@pytest.mark.parametrize("head_type", layout_parity.HEAD_TYPES)
def test_zero3_on_uneven_valid_targets_gives_one_process_gradients_for_every_head_type(
    dist_world, ds_runs, head_type
):
    """The same first step for each head type beyond parallel: ZeRO-3's reduced gradients are one process's."""
    name = f"masked-zero3-ga2-tp1dp2-{head_type}"
    _, grads, _ = layout_parity.run_masked(
        4, dp=1, ga=1, micro=len(layout_parity.PAD_FROM), steps=1, head_type=head_type
    )
    got = torch.load(ds_runs / f"{name}-grads.pt", weights_only=True)
    assert_step_gradients_equal(got, grads, name)
