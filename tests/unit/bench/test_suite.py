"""make bench's summary: every benchmark's JSON -> the README table rows, and the README section update."""

import pytest

from mtp_pretrain.bench.suite import README_BEGIN, README_END, markdown, plot, summarise, update_readme

MIB = 2**20
RAW = {
    "memory_v32k": {
        "result": {
            "shape": {"vocab": 32768},
            "rows": [
                {"n": n, "mode": mode, "peak_bytes": peak * n * MIB}
                for n in (1, 4)
                for mode, peak in (("naive", 40), ("efficient", 10), ("chunked(64)", 5))
            ],
        }
    },
    "step": {"result": {"time_ratio": 1.3, "flop_ratio": 1.25, "time_over_flops": 1.04}},
    "megatron": {
        "result": {
            "megatron_peak_mib": 30.0,
            "ours_peak_mib": 10.0,
            "megatron_step_s": 0.2,
            "ours_step_s": 0.1,
            "memory_ratio": 3.0,
            "time_ratio": 2.0,
            "ours_sequential_peak_mib": 12.0,
            "ours_sequential_step_s": 0.25,
            "sequential_memory_ratio": 0.4,
            "sequential_time_ratio": 1.25,
        }
    },
    "head_types": {
        "result": {
            "config": {"n": 4, "reference": "parallel", "attention": "local"},
            "rows": [
                {
                    "head_type": "parallel",
                    "peak_mib": 10.0,
                    "step_s": 0.1,
                    "memory_ratio": 1.0,
                    "time_ratio": 1.0,
                },
                {
                    "head_type": "causal",
                    "peak_mib": 8.0,
                    "step_s": 0.15,
                    "memory_ratio": 0.8,
                    "time_ratio": 1.5,
                },
            ],
        }
    },
    "data": {
        "result": {
            "rows": [
                {"content": "text", "workers": 0, "ratio": 25.0},
                {"content": "tokens", "workers": 1, "ratio": 90.0},
            ]
        }
    },
    "decode": {"error": "exit 1", "seconds": 3.0},
}


def test_summary_rows():
    rows = summarise(RAW)
    assert rows[0] == [
        "loss-step peak memory, V=32k, n=1",
        "naive 40 / efficient 10 / chunked 5 MiB",
        "naive 4.00x, chunked 0.50x of efficient; efficient 1.00x its n=1",
    ]
    assert rows[1][2].endswith("efficient 4.00x its n=1")
    assert rows[2] == [
        "step time n=4 / n=1 (same trunk, attention local)",  # results without the key predate sdpa
        "time 1.300x, FLOPs 1.250x",
        "time/FLOP 1.040 (target <= 1.05)",
    ]
    assert rows[3][1:] == [
        "peak 30 vs 10 MiB, step 0.200 vs 0.100 s",
        "megatron/ours: memory 3.00x, time 2.00x",
    ]
    assert rows[4] == [
        "ours sequential heads (DeepSeek-V3 MTP modules) vs megatron-core built-in MTP, same design, attention local",
        "peak 12 vs 30 MiB, step 0.250 vs 0.200 s",
        "sequential/megatron: memory 0.40x, time 1.25x (goal: memory < 1, time <= 1.0)",
    ]
    assert rows[5:7] == [
        [
            "MTP head type parallel, n=4: training-step peak memory / step time ÷ parallel (attention local)",
            "peak 10 MiB, step 0.100 s",  # the reference's own figures
            "memory 1.00x, time 1.00x",
        ],
        [
            "MTP head type causal, n=4: training-step peak memory / step time ÷ parallel (attention local)",
            "peak 8 vs 10 MiB, step 0.150 vs 0.100 s",
            "memory 0.80x, time 1.50x",
        ],
    ]
    assert rows[7][1:] == ["text w0 25x, tokens w1 90x", "min 25x (target >= 20x)"]
    assert rows[8] == ["decode", "FAILED", "exit 1"]  # a failed benchmark still has its row


def test_megatron_results_from_before_ours_sequential_give_the_one_row():
    old = {k: v for k, v in RAW["megatron"]["result"].items() if "sequential" not in k}
    rows = summarise({"megatron": {"result": old}})
    assert len(rows) == 1 and rows[0][2] == "megatron/ours: memory 3.00x, time 2.00x"


def test_the_plot_takes_every_benchmarks_results(tmp_path):
    # every benchmark's figures reach a panel without a missing key (the head types' panel, the sequential /
    # megatron bars); what the panels show is looked at, not asserted
    plot(RAW, tmp_path / "results.png")
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_and_readme_section(tmp_path):
    table = markdown([["a", "b", "c"]])
    assert table == "| benchmark | measured (this run) | ratio |\n|---|---|---|\n| a | b | c |\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\nafter\n")
    update_readme(table, readme)
    text = readme.read_text()
    assert text.startswith(f"intro\n{README_BEGIN}\n_Measured by `make bench` on ")
    assert text.endswith(f"{table}{README_END}\nafter\n") and "old" not in text


def test_a_partial_run_keeps_the_other_rows(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\n{markdown([['a', '1', 'x'], ['b', '2', 'y']])}{README_END}\n")
    update_readme(markdown([["b", "3", "z"], ["c", "4", "w"]]), readme, partial=True)
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| ")][1:]  # after the header
    assert rows == ["| a | 1 | x |", "| b | 3 | z |", "| c | 4 | w |"]


def test_readme_without_the_section_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        update_readme("| x |\n", readme)
