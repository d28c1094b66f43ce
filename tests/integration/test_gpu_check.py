"""tools/gpu_check.sh --dry-run, as CI runs it (no GPU, no .whl/, no download): the wheel list checks out
against pyproject.toml, the gpu tests are collected, the bench runs on the tiny model, one table comes last
and its JSON lands under $OUT."""

import json
from pathlib import Path

from tests.launch import clean_env, run


def test_dry_run_checks_wheels_collects_gpu_tests_and_benches(tmp_path: Path) -> None:
    out = run(["bash", "tools/gpu_check.sh", "--dry-run"], timeout=120, env=clean_env(OUT=str(tmp_path)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.rindex("part ") :]  # the one table, printed last
    assert table.rstrip().splitlines()[-1].split()[:3] == ["GPU", "check", "PASS"], table
    for part in ("wheels", "install", "tests (collect only)", "bench", "n=1 T=", "n=4 T=", "n4/n1"):
        assert part in table, (part, table)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] is True
    assert result["parts"]["install"]["rc"] == 200  # skipped: a dry run installs nothing
    assert result["wheels"]["problems"] == [] and result["wheels"]["made_bytes"] == {}  # nothing downloaded
    assert 0 < result["wheels"]["declared_mib"] <= 60
    listed = {w["name"] for w in result["wheels"]["wheels"]}
    assert {"megatron-core", "deepspeed", "hydra-core", "webdataset", "mtp-pretrain"} <= listed
    assert not any(n.startswith(("torch", "nvidia")) for n in listed)
    assert result["tests"]["collected"] >= 8  # tests/gpu: loss, attention, training, decoding
    bench = result["bench"]
    assert bench["dry_run"] is True and {r["n"] for r in bench["rows"]} == {1, 4}
