"""The benchmarks' command line, JSON output and Hydra config."""

import json
from pathlib import Path

from mtp_pretrain.bench.options import add_shape_args, bench_parser, write_json
from mtp_pretrain.config import compose_train_config


def test_parser_shape_options_and_json():
    p = bench_parser("doc")
    add_shape_args(p, hidden=64, heads=2, trunk_layers=1, seq=32, batch=2, vocab=512)
    args = p.parse_args(["--hidden", "128", "--json", "out/r.json"])
    assert (args.hidden, args.heads, args.trunk_layers, args.seq, args.batch, args.vocab) == (
        128,
        2,
        1,
        32,
        2,
        512,
    )
    assert args.json == Path("out/r.json")
    assert p.parse_args([]).json is None
    assert "json" not in vars(bench_parser("doc", results_json=False).parse_args([]))


def test_write_json_creates_the_directory_and_writes_paths_as_text(tmp_path):
    out = tmp_path / "deep" / "r.json"
    write_json(out, {"json": Path("a/b"), "rows": [{"n": 1}]})
    assert json.loads(out.read_text()) == {"json": "a/b", "rows": [{"n": 1}]}


def test_compose_train_config_applies_overrides():
    cfg = compose_train_config(["model=tiny", "mtp.n=2", "model.seq_len=64"])
    assert (cfg.model.preset, cfg.mtp.n, cfg.model.seq_len) == ("tiny", 2, 64)
