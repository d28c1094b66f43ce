"""bench_head_types's command line: which head types run, and in what order."""

import pytest

from mtp_pretrain.bench.head_types import HEAD_TYPES, parse_args


def test_every_type_by_default_the_reference_first():
    assert parse_args([]).types == list(HEAD_TYPES) and HEAD_TYPES[0] == "parallel"


def test_a_subset_runs_with_the_reference_in_the_types_order():
    assert parse_args(["--types", "sequential,causal"]).types == ["parallel", "causal", "sequential"]


def test_unknown_head_type_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--types", "parallel,diagonal"])
    assert exit_.value.code == 2 and "unknown head type(s) ['diagonal']" in capsys.readouterr().err
