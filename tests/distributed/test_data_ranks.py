"""The trainer's data on several ranks (one torchrun launch, TP2 x DP2, 2 loader workers per rank)."""

import json

import pytest

from tests.distributed import data_resume as script
from tests.distributed.test_tensor_parallel import ROOT, torchrun


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, synthetic_source):
    out = tmp_path_factory.mktemp("data_ranks")
    proc = torchrun(4, ROOT / "tests" / "distributed" / "data_resume.py", str(out), str(synthetic_source), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "ranks.json").read_text())


def test_tensor_parallel_peers_see_identical_batches_and_dp_ranks_differ(ranks):
    by_dp = {}
    for r in ranks:
        assert len(r["full"]["batches"]) == script.STEPS * 2  # grad_accum 2
        by_dp.setdefault(r["dp_rank"], []).append(r["full"]["batches"])
    assert sorted(by_dp) == [0, 1] and all(len(v) == 2 for v in by_dp.values())
    for peers in by_dp.values():
        assert peers[0] == peers[1]
    assert not set(by_dp[0][0]) & set(by_dp[1][0])  # disjoint shards => no shared batch


def test_resume_on_every_rank_continues_the_same_batches_and_losses(ranks):
    k = script.RESUME_AT * 2
    for r in ranks:
        assert r["resumed"]["batches"] == r["full"]["batches"][k:], (r["tp_rank"], r["dp_rank"])
        assert r["resumed"]["losses"] == r["full"]["losses"][script.RESUME_AT :]  # bit-identical
        assert r["full"]["val"]["loss/head1"] > 0 and r["resumed"]["val"] == r["full"]["val"]
