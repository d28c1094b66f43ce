"""mtp.weight_schedule: each rule's weights at hand-computed progress points, n=1, and the config's one-line
errors. Exact float equality: every expected value below is exactly representable or computed by the same
single expression (0.3 + (0.1 - 0.3) * p), so any deviation is a wrong rule, not rounding."""

import pytest
from omegaconf import OmegaConf

from mtp_pretrain.config import ConfigError, MTPConfig, to_config
from mtp_pretrain.weight_schedule import head_weights, metrics, progress, set_weights
from tests.conftest import compose_config


def _mtp(schedule: str, n: int = 4, **kw) -> MTPConfig:
    return MTPConfig(n=n, weight_schedule=schedule, **kw)


def test_progress_is_the_fraction_of_steps_done_before_the_step():
    assert [progress(s, 8) for s in (0, 2, 7, 8, 9)] == [0.0, 0.25, 0.875, 1.0, 1.0]


def test_constant_is_the_config_weights_at_every_point():
    for mtp in (
        _mtp("constant"),
        _mtp("constant", extra_heads_weight=0.1),
        _mtp("constant", n=2, loss_weights=[2.0, 0.5]),
    ):
        assert all(head_weights(mtp, p) == mtp.weights() for p in (0.0, 0.4, 1.0))


def test_step_switches_extra_heads_at_the_fraction():
    mtp = _mtp("step")  # defaults: DeepSeek-V3's 0.3 -> 0.1 after 10T of 14.8T tokens
    assert (mtp.weight_start, mtp.weight_end, mtp.weight_switch_at) == (0.3, 0.1, 0.676)
    assert head_weights(mtp, 0.0) == [1.0, 0.3, 0.3, 0.3]
    assert head_weights(mtp, 0.675) == [1.0, 0.3, 0.3, 0.3]
    assert head_weights(mtp, 0.676) == [1.0, 0.1, 0.1, 0.1]  # the switch point itself is after the switch
    assert head_weights(mtp, 1.0) == [1.0, 0.1, 0.1, 0.1]
    custom = _mtp(
        "step", n=2, weight_start=0.5, weight_end=0.0, weight_switch_at=0.25, extra_heads_weight=0.7
    )
    assert [head_weights(custom, p) for p in (0.2, 0.25)] == [
        [1.0, 0.5],
        [1.0, 0.0],
    ]  # not extra_heads_weight


def test_linear_ramps_extra_heads_from_start_to_end():
    mtp = _mtp("linear", n=3, weight_start=1.0, weight_end=0.0)
    assert [head_weights(mtp, p) for p in (0.0, 0.25, 0.5, 1.0)] == [
        [1.0, 1.0, 1.0],
        [1.0, 0.75, 0.75],
        [1.0, 0.5, 0.5],
        [1.0, 0.0, 0.0],
    ]
    assert head_weights(_mtp("linear", n=2), 0.5) == [1.0, 0.3 + (0.1 - 0.3) * 0.5]  # defaults 0.3 -> 0.1


def test_forward_curriculum_switches_heads_on_in_equal_stages():
    mtp = _mtp("forward", extra_heads_weight=0.5)  # n=4, f=1: heads 2, 3, 4 on from 1/4, 2/4, 3/4
    assert head_weights(mtp, 0.0) == [1.0, 0.0, 0.0, 0.0]
    assert head_weights(mtp, 0.24) == [1.0, 0.0, 0.0, 0.0]
    assert head_weights(mtp, 0.25) == [1.0, 0.5, 0.0, 0.0]
    assert head_weights(mtp, 0.6) == [1.0, 0.5, 0.5, 0.0]
    assert head_weights(mtp, 0.75) == [1.0, 0.5, 0.5, 0.5]
    assert head_weights(mtp, 1.0) == [1.0, 0.5, 0.5, 0.5]
    half = _mtp("forward", n=2, loss_weights=[2.0, 0.25], curriculum_fraction=0.5)  # head 2 on from 0.25
    assert [head_weights(half, p) for p in (0.2, 0.25, 0.9)] == [[2.0, 0.0], [2.0, 0.25], [2.0, 0.25]]


def test_reverse_curriculum_switches_the_last_heads_off_first():
    mtp = _mtp("reverse")  # n=4, f=1: heads 4, 3, 2 off from 1/4, 2/4, 3/4
    assert head_weights(mtp, 0.0) == [1.0, 1.0, 1.0, 1.0]
    assert head_weights(mtp, 0.25) == [1.0, 1.0, 1.0, 0.0]
    assert head_weights(mtp, 0.5) == [1.0, 1.0, 0.0, 0.0]
    assert head_weights(mtp, 0.74) == [1.0, 1.0, 0.0, 0.0]
    assert head_weights(mtp, 0.75) == [1.0, 0.0, 0.0, 0.0]
    assert head_weights(mtp, 1.0) == [1.0, 0.0, 0.0, 0.0]
    half = _mtp("reverse", n=2, curriculum_fraction=0.5)  # head 2 off from 0.25
    assert [head_weights(half, p) for p in (0.2, 0.25)] == [[1.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize("schedule", ["constant", "step", "linear", "forward", "reverse"])
def test_n1_is_head1_alone_throughout(schedule):
    mtp = _mtp(schedule, n=1)
    assert all(head_weights(mtp, p) == [1.0] for p in (0.0, 0.5, 1.0))


def test_set_weights_reaches_every_loss_and_metrics_name_each_head():
    class Loss:
        weights = (1.0, 1.0)

    losses = [Loss(), Loss()]
    set_weights(losses, [1.0, 0.3])
    assert [loss.weights for loss in losses] == [(1.0, 0.3)] * 2
    assert metrics([1.0, 0.3]) == {"mtp_weight_1": 1.0, "mtp_weight_2": 0.3}


@pytest.fixture(scope="module")
def defaults():
    return compose_config()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["mtp.weight_schedule=cosine"], "mtp.weight_schedule='cosine'"),
        (["mtp.weight_schedule=step", "mtp.weight_switch_at=1.5"], "mtp.weight_switch_at=1.5"),
        (["mtp.weight_schedule=forward", "mtp.curriculum_fraction=0"], "mtp.curriculum_fraction=0"),
        (["mtp.weight_schedule=linear", "mtp.weight_end=-0.1"], "mtp.weight_end=-0.1"),
        (["mtp.weight_schedule=step", "mtp.n=2", "mtp.loss_weights=[1,0.5]"], "drop mtp.loss_weights"),
    ],
)
def test_bad_schedule_settings_fail_in_one_line_naming_the_key(defaults, overrides, key):
    with pytest.raises(ConfigError) as err:
        to_config(OmegaConf.merge(OmegaConf.structured(defaults), OmegaConf.from_dotlist(overrides)))
    assert key in str(err.value) and "\n" not in str(err.value)
