"""Command-line entry points: set-up errors end with one line and exit status 2; the data tools work."""

import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from mtp_pretrain.cli import make_shards, train_tokenizer
from mtp_pretrain.errors import EXIT_DATA
from tests.launch import clean_env, cli, run


def _train_cli(*overrides: str) -> subprocess.CompletedProcess:
    return run(cli(*overrides), env=clean_env(WANDB_MODE="disabled"), timeout=120)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mtp-train: error:")]


def test_config_error_exits_2_with_one_line(tmp_path):
    run = _train_cli("mtp.n=6", "model.num_layers=6", f"trainer.run_dir={tmp_path / 'run'}")
    assert run.returncode == 2, run.stderr
    errors = _error_lines(run.stderr)
    assert len(errors) == 1, run.stderr
    assert "model.num_layers" in errors[0]
    assert "Traceback" not in run.stderr + run.stdout
    assert run.stderr.strip() == errors[0]  # no library chatter around it
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before anything was built


def test_missing_data_path_exits_4_naming_it(tmp_path):
    missing = tmp_path / "no_such_corpus"
    run = _train_cli(
        f"data.source=[{missing}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"trainer.run_dir={tmp_path / 'run'}",
    )
    assert run.returncode == EXIT_DATA, run.stderr
    errors = _error_lines(run.stderr)
    assert len(errors) == 1, run.stderr
    assert str(missing) in errors[0]
    assert "Traceback" not in run.stderr + run.stdout
    assert "Apex are not installed" not in run.stderr  # megatron's import-time chatter is silenced
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture
def py_tree(tmp_path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    for i in range(5):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(8))
        (root / f"m{i}.py").write_text(body)
    (root / "notes.bin").write_text("not taken: wrong suffix")
    return root


def test_make_shards_writes_shards(py_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    make_shards([str(py_tree), "--out", str(out), "--docs-per-shard", "2", "--prefix", "part"])
    shards = sorted(out.glob("part-*.tar"))
    assert [p.name for p in shards] == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]  # 5 docs / 2
    members = [m for s in shards for m in tarfile.open(s).getnames()]
    assert sum(m.endswith(".txt") for m in members) == 5 and sum(m.endswith(".json") for m in members) == 5
    texts = {
        tarfile.open(s).extractfile(m).read().decode()
        for s in shards
        for m in tarfile.open(s).getnames()
        if m.endswith(".txt")
    }
    assert texts == {p.read_text() for p in py_tree.glob("*.py")}
    assert f"wrote 3 shard(s), 5 documents to {out}" in capsys.readouterr().out
    # pre-tokenized, with a target shard size (100 bytes of payload: one document per shard) + the manifest
    tok = tmp_path / "tokenizer.json"
    train_tokenizer([str(py_tree), "--out", str(tok), "--vocab-size", "300"])
    make_shards(
        [
            str(py_tree),
            "--out",
            str(tmp_path / "tok"),
            "--tokenizer",
            str(tok),
            "--shard-size-mb",
            "0.0001",
            "--workers",
            "2",
        ]
    )
    manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert manifest["content"] == "tokens" and manifest["num_samples"] == 5 and len(manifest["shards"]) == 5
    assert manifest["num_tokens"] > 0 and f"{manifest['num_tokens']} tokens" in capsys.readouterr().out


def test_train_tokenizer_writes_a_loadable_tokenizer(py_tree, tmp_path):
    out = tmp_path / "tok" / "tokenizer.json"
    train_tokenizer([str(py_tree), "--out", str(out), "--vocab-size", "300"])
    tok = Tokenizer.from_file(str(out))
    assert 258 < tok.get_vocab_size() <= 300  # byte alphabet + 2 specials + learnt merges
    text = (py_tree / "m0.py").read_text()
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # merges were learnt


@pytest.mark.parametrize("tool", [make_shards, train_tokenizer])
@pytest.mark.parametrize("bad", ["missing", "empty"])
def test_data_tools_bad_source_exit_2(tool, bad, tmp_path, capsys):
    source = tmp_path / bad
    if bad == "empty":
        source.mkdir()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        tool([str(source), "--out", str(out / "tokenizer.json" if tool is train_tokenizer else out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0] and str(source) in err[0]
    assert not list(out.glob("*.tar")) and not (out / "tokenizer.json").exists()
