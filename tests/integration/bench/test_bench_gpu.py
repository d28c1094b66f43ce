"""tools/bench_gpu.sh in its dry mode (no CUDA here): the same code path as the 1B GPU run, on the tiny model."""

import json
from pathlib import Path

from tests.launch import run


def test_dry_run_reports_n1_and_n4(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run_ = run(["bash", "tools/bench_gpu.sh", "--dry-run", "--json", str(out)], timeout=180)
    assert run_.returncode == 0, run_.stderr[-3000:]
    assert "DRY RUN" in run_.stdout, run_.stdout
    assert "time ratio n4/n1" in run_.stdout, run_.stdout
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    rows = {r["n"]: r for r in result["rows"]}
    assert set(rows) == {1, 4}, result["rows"]
    for n, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0, (n, row)
        assert row["step_s"] > 0 and len(row["step_times_s"]) == result["steps"]
    assert result["flop_ratio"] > 1.0  # n=4 adds three unembeddings at the same L
    # the sdpa vs local rows at the attention T (the preset's in the dry run), or why they are missing
    kernels = {r["attention"]: r for r in result["attention_rows"]}
    if result["attention_note"] is None:
        assert set(kernels) == {"sdpa", "local"} and result["sdpa_over_local"] > 0
        assert "step time ratio sdpa/local" in run_.stdout
    else:
        assert "sdpa vs local: not measured" in run_.stdout


def test_attention_rows_degrade_without_the_attention_key(monkeypatch) -> None:
    """A version without `model.attention`: the optional rows become a message, nothing is built."""
    from hydra.errors import ConfigCompositionException

    from mtp_pretrain.bench import gpu

    def compose(preset, n, seq, attention=None):
        raise ConfigCompositionException(
            "Could not override 'model.attention'.\nKey 'attention' is not in struct"
        )

    monkeypatch.setattr(gpu, "compose", compose)
    rows, note = gpu.bench_attention(gpu.parse_args(["--dry-run"]), peak=1.0)
    assert rows == [] and "model.attention=sdpa is not available" in note and "Could not override" in note
