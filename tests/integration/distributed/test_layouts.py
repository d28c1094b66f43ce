"""Every parallel layout trains like one process: per-head loss curves, gradient norms and final parameters
(fp32, gloo).

Two torchrun launches (2 and 4 ranks) run all layouts of tests/distributed/layout_parity.py; this
process runs the single-process reference on the same global batches and loads each layout's final
dist_checkpointing save into its own TP1/PP1 model (resharding) to compare every parameter.
"""

import pytest
import torch

from mtp_pretrain.targets import valid_counts
from tests.integration.distributed import layout_parity as script
from tests.integration.distributed.parity import (
    assert_step_gradients_equal,
    compare_to_reference,
    launch_all,
    load_run,
    relative_differences,
)

# world 2: TP2, PP2, DP2 (+ PP2 tied, PP2 uneven, PP2 x VPP2 interleaved, DP2 on very uneven valid targets);
# world 4: TP2xPP2, DP2xPP2, DP2xTP2 (+ TP2xPP2 tied). Core attention sdpa, or megatron's local
# DotProductAttention where "local" says so: both backends under TP, PP and DP, without another launch
LAUNCHES = {
    2: [
        "2,1",
        "1,2",
        "1,1,local",
        "1,2,tie",
        "1,2,uneven,local",
        "1,2,vpp2",
        "1,1,masked",
        "2,1,types",
        "1,2,types",
    ],
    4: ["2,2,local", "1,2", "2,1,local", "2,2,tie"],
}


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    return launch_all(tmp_path_factory.mktemp("layouts"), "layout_parity.py", LAUNCHES)


def _reference(n: int, dp: int, tie: bool, attention: str, head_type: str = "parallel"):
    # an uneven pipeline split: the same model
    history, engine = script.run(
        n, tp=1, pp=1, dp=1, ga=script.GA * dp, tie=tie, attention=attention, head_type=head_type
    )
    return (
        history,
        {
            k: v.detach().clone()
            for k, v in engine.model.module.state_dict().items()
            if "_extra_state" not in k
        },
        engine,
    )


@pytest.mark.parametrize("n", [1, 4])
def test_every_layout_matches_one_process(dist_world, layout_runs, n):
    names = sorted(p.stem for p in layout_runs.glob(f"tp*-n{n}*.json"))
    assert len(names) == 8, names  # tp2, pp2, dp2, tp2pp2, dp2pp2, dp2tp2 + (uneven, vpp2) or (2 tied)
    references = {}
    worst_rel, worst_param = 0.0, 0.0
    for name in names:
        # "-uneven" / "-vpp2" split the same model differently: same reference, of the layout's core attention
        dp, tie = int(name.split("dp")[1].split("-")[0]), name.endswith("-tie")
        key = (dp, tie, "local" if name.endswith("-local") else "sdpa")
        if key not in references:
            references[key] = _reference(n, *key)
        ref_history, ref_params, ref_engine = references[key]
        history, loaded = load_run(layout_runs, name, ref_engine.model.module)
        assert len(history) == script.STEPS
        worst = compare_to_reference(name, history, ref_history, loaded, ref_params, script.OPTIM.lr)
        worst_rel, worst_param = max(worst_rel, worst[0]), max(worst_param, worst[1])
    print(
        f"n={n}: worst loss / grad norm difference {worst_rel:.1f} eps (relative), "
        f"worst param diff {worst_param:.2e}"
    )


def test_uneven_valid_targets_give_one_process_gradients_under_global_normalization(dist_world, layout_runs):
    """DP2 x grad accumulation 2, valid targets spread very unevenly over the ranks' micro-batches (padding,
    document boundaries): under mtp.loss_normalization=global the reduced gradients of the step are those of
    one process on the concatenated batch, and so are the losses, gradient norms and final parameters over
    STEPS steps; under micro_batch the same step's gradients differ (the check can fail)."""
    T = script.model_cfg(4).seq_len
    per_micro = [
        valid_counts(script.masked_micro_batches(0, 4, 2, r, script.GA, script.MICRO)[m : m + 1], T)
        for r in range(2)
        for m in range(script.GA)
    ]
    assert max(int(c[0]) for c in per_micro) >= 3 * min(int(c[0]) for c in per_micro)  # uneven indeed
    history, grads, params, engine = script.masked_reference()
    got = torch.load(layout_runs / "masked-dp2-global-grads.pt", weights_only=True)
    worst = assert_step_gradients_equal(got, grads, "DP2 x GA2, global")
    control = torch.load(layout_runs / "masked-dp2-micro_batch-grads.pt", weights_only=True)
    worst_control = max(relative_differences(control, grads).values())
    assert worst_control > 0.05, worst_control  # the micro-batch means reweigh the positions
    run_history, loaded = load_run(layout_runs, "masked-dp2-global", engine.model.module)
    compare_to_reference("masked-dp2-global", run_history, history, loaded, params, script.OPTIM.lr)
    print(f"masked DP2 x GA2: gradients within {worst:.1e} (global), micro_batch off by {worst_control:.2f}")


@pytest.mark.parametrize("head_type", script.HEAD_TYPES)
def test_every_head_type_trains_like_one_process_under_tp2_and_pp2(dist_world, layout_runs, head_type):
    """n=4 heads of each type under TP2 and PP2 (sequential also tied under PP2: its embedding lookups read
    the last stage's copy, whose gradient is all-reduced with the first stage's): the losses, gradient norms
    and final parameters (the checkpoint loaded into one process, the copy resumed from the embedding's key)
    of one process; the DP2 x GA2 step on very uneven masks gives one process's gradients."""
    names = sorted(p.stem for p in layout_runs.glob(f"heads-{head_type}-*.json"))
    assert len(names) == (3 if head_type == "sequential" else 2), names
    references = {}
    for name in names:
        tie = "-tie-" in name
        if tie not in references:
            references[tie] = _reference(4, 1, tie, "sdpa", head_type)
        ref_history, ref_params, ref_engine = references[tie]
        history, loaded = load_run(layout_runs, name, ref_engine.model.module)
        assert len(history) == script.STEPS
        compare_to_reference(name, history, ref_history, loaded, ref_params, script.OPTIM.lr)
    _, grads, _ = script.run_masked(4, dp=1, ga=1, micro=len(script.PAD_FROM), steps=1, head_type=head_type)
    got = torch.load(layout_runs / f"masked-dp2-{head_type}-grads.pt", weights_only=True)
    assert_step_gradients_equal(got, grads, f"DP2 x GA2, global, {head_type}")
