"""Every random stream of a rank is captured and restored exactly, also through a weights_only checkpoint."""

import io
import random

import numpy as np
import pytest
import torch
from megatron.core import tensor_parallel

from mtp_pretrain.rng import get_rng_state, seed_streams, set_rng_state


@pytest.fixture
def restore_rng(dist_world):
    """Leave the process's streams as found: other tests draw from them too."""
    state = get_rng_state()
    yield
    set_rng_state(state)


def _draw() -> dict:
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():  # megatron's model-parallel stream (dropout in TP regions)
        forked = torch.rand(4)
    return {
        "python": [random.random(), random.gauss(0.0, 1.0), random.getrandbits(64)],
        "numpy": np.concatenate([np.random.rand(3), [np.random.standard_normal()]]),
        "torch": torch.randn(5),
        "tracker": forked,
    }


def _assert_same(a: dict, b: dict) -> None:  # the same generator states draw the same bits: exact
    assert a["python"] == b["python"]
    np.testing.assert_array_equal(a["numpy"], b["numpy"])
    assert torch.equal(a["torch"], b["torch"])
    assert torch.equal(a["tracker"], b["tracker"])


def _assert_all_differ(a: dict, b: dict) -> None:
    assert a["python"] != b["python"]
    assert not np.array_equal(a["numpy"], b["numpy"])
    assert not torch.equal(a["torch"], b["torch"])
    assert not torch.equal(a["tracker"], b["tracker"])


def _warm_up() -> None:
    # leave a cached second Gaussian in python's and numpy's generators: part of the state
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    _draw()


def test_round_trip_restores_every_stream(restore_rng):
    _warm_up()
    state = get_rng_state()
    first = _draw()
    second = _draw()
    _assert_all_differ(first, second)  # the streams advance, so equality below means a real restore
    set_rng_state(state)
    _assert_same(_draw(), first)
    _assert_same(_draw(), second)


def test_state_survives_a_weights_only_checkpoint(restore_rng):
    _warm_up()
    state = get_rng_state()
    expected = _draw()
    buffer = io.BytesIO()
    torch.save({"rng": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rng"]  # only plain types: no pickled code
    _draw()  # move every stream on
    set_rng_state(loaded)
    _assert_same(_draw(), expected)


def test_state_is_a_snapshot(restore_rng):
    state = get_rng_state()
    before = _draw()
    after_draw = get_rng_state()
    set_rng_state(state)  # the snapshot taken earlier was not changed by drawing
    _assert_same(_draw(), before)
    set_rng_state(after_draw)
    _assert_all_differ(_draw(), before)


def test_seed_streams_starts_python_numpy_and_tracker_from_the_seed(restore_rng):
    """A fresh process seeds python and numpy from OS entropy: two runs of one config must not save
    different states, so the run's seed starts them (torch's global generator is the trainer's to seed)."""
    draws = []
    for seed in (7, 7, 8):
        seed_streams(seed)
        torch.manual_seed(0)  # the same torch stream each time: only the seeded streams may differ
        draws.append(_draw())
    _assert_same(draws[0], draws[1])
    assert draws[0]["python"] != draws[2]["python"]
    assert not np.array_equal(draws[0]["numpy"], draws[2]["numpy"])
    assert not torch.equal(draws[0]["tracker"], draws[2]["tracker"])
