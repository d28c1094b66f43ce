"""tools/bench_decode.py: greedy vs self-speculative tokens/s on held-out prompts, tokens identical."""

import json

from tests.launch import tool as run_tool


def test_speculative_decoding_is_measured_against_greedy(mtp_run, tmp_path):
    out = tmp_path / "decode.json"
    args = [
        "--model",
        str(mtp_run.checkpoint),
        "--prompts",
        "4",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "16",
        "--batch-sizes",
        "1,4",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    run = run_tool("bench_decode.py", *args)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 4] and result["heads"] == 4
    for r in result["rows"]:
        assert r["identical"] is True
        assert r["greedy_tok_s"] > 0 and r["speculative_tok_s"] > 0
        # speedup = greedy / speculative seconds = the ratio of the two rates (both float64 divisions of the same
        # token count): a few float64 ulps apart; 1e-6 relative only guards the definition
        assert abs(r["speedup"] - r["speculative_tok_s"] / r["greedy_tok_s"]) < 1e-6 * r["speedup"]
        assert 1.0 < r["tokens_per_forward"] <= 4.0 and len(r["acceptance"]) == 3
        assert (
            r["auto_speedup"] > 0
            and r["perfect_drafts_speedup"] > 0
            and r["perfect_tokens_per_forward"] > 1.0
        )
    assert "speculative tok/s" in run.stdout
