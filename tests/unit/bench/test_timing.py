"""Timed steps: the interleaving order, which rounds are timed, and step time against FLOPs."""

import time

import pytest

from mtp_pretrain.bench.timing import format_time_over_flops, interleaved, time_over_flops, timed


def test_timed_returns_the_result_and_the_wall_time():
    out, seconds = timed(lambda: time.sleep(0.02) or "done")
    assert out == "done"
    assert 0.02 <= seconds < 1.0  # the sleep, plus at most a loaded machine's scheduling delay


@pytest.mark.parametrize(
    ("alternate", "order"),
    [(False, ["a", "b", "a", "b", "a", "b"]), (True, ["a", "b", "b", "a", "a", "b"])],
)
def test_interleaved_rounds_and_order(alternate, order):
    calls = []

    def step(name):
        return lambda: calls.append(name) or len(calls)

    times, results = interleaved({"a": step("a"), "b": step("b")}, warmup=1, rounds=2, alternate=alternate)
    assert calls == order
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}  # the warm-up round is not timed
    assert results == {k: [i + 1 for i, c in enumerate(order) if c == k] for k in "ab"}  # every round's


def test_time_over_flops():
    r = time_over_flops({1: 2.0, 4: 3.0}, {1: 100.0, 4: 120.0})
    assert r == {"time_ratio": 1.5, "flop_ratio": 1.2, "time_over_flops": 1.5 / 1.2}
    assert format_time_over_flops(r) == "time ratio n4/n1 1.500 | FLOP ratio 1.200 | time/FLOP ratio 1.250"
