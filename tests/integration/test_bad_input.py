"""Bad input to every command ends with one ``<command>: error: ...`` line, the documented exit status, no
traceback, and nothing lost (issue 17). Errors that need no training run in-process; mtp-train's run its CLI.

Exit statuses (mtp_pretrain/errors.py): 2 usage/config, 4 data, 5 checkpoint.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mtp_pretrain.cli import export, make_shards, plot, submit, train_tokenizer
from mtp_pretrain.errors import EXIT_CHECKPOINT, EXIT_DATA, EXIT_USAGE
from mtp_pretrain.inference.cli import evaluate, generate
from tests.launch import clean_env, cli, run


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash: what "nothing was lost or changed" compares."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_one_error(prog: str, code: int | None, expected: int, stderr: str, *mentions: str) -> str:
    """Exit ``expected``, exactly one ``prog: error:`` line naming ``mentions``, no traceback anywhere."""
    errors = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert code == expected, stderr
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for m in mentions:
        assert m in errors[0], (m, errors[0])
    return errors[0]


def call(command: Callable[[list[str]], None], *argv: str) -> int | None:
    """Run an argparse entry point in-process; its exit status (None: it returned)."""
    try:
        command(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return None


# -- the data tools -------------------------------------------------------------------------------------
@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.py").write_text("def f(x):\n    return x + 1\n" * 20)
    cut = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(b'{"text": "hello"}\n' * 200)
    cut.write_bytes(data[: len(data) // 2])
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"body": "x"}\n')
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": \n')
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    return {"good": good, "cut": cut, "nofield": no_field, "badjson": bad_json, "latin1": latin1}


@pytest.mark.parametrize(
    "tool", [make_shards, train_tokenizer], ids=["mtp-make-shards", "mtp-train-tokenizer"]
)
@pytest.mark.parametrize("case", ["missing", "cut", "nofield", "badjson", "out_is_file"])
def test_data_tools(tool, case, sources, tmp_path, capsys):
    prog = "mtp-make-shards" if tool is make_shards else "mtp-train-tokenizer"
    source = str(tmp_path / "missing") if case == "missing" else str(sources.get(case, sources["good"]))
    out = tmp_path / "out"
    if case == "out_is_file":
        out.write_text("precious")
    target = out / "tokenizer.json" if tool is train_tokenizer else out  # out_is_file: a file in its path
    before = tree_digest(tmp_path / "good")
    code = call(
        tool, source, "--out", str(target), *(["--vocab-size", "300"] if tool is train_tokenizer else [])
    )
    mention = {"out_is_file": str(out), "missing": source}.get(case, Path(source).name)
    assert_one_error(prog, code, EXIT_USAGE, capsys.readouterr().err, mention)
    assert tree_digest(tmp_path / "good") == before
    if case == "out_is_file":
        assert out.read_text() == "precious"


# -- the model tools ------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(mtp_run, tmp_path) -> Path:
    """A private copy of the trained run's checkpoint, free to corrupt."""
    copy = tmp_path / mtp_run.checkpoint.name
    shutil.copytree(mtp_run.checkpoint, copy)
    return copy


def flip_byte(path: Path, at: int = -100) -> None:
    """Corrupt ``path`` without changing its size (what a size check cannot see)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_checkpoint_is_refused_by_every_reader(checkpoint, tmp_path, capsys):
    flip_byte(checkpoint / "trainer.pt")
    before = tree_digest(checkpoint)
    prompt = tmp_path / "p.txt"
    prompt.write_text("def f(")
    for prog, command, extra in [
        ("mtp-export", export, ["--out", str(tmp_path / "hf")]),
        ("mtp-generate", generate, ["--prompt", "def f(", "--max-new-tokens", "2", "--device", "cpu"]),
        ("mtp-eval", evaluate, ["--batches", "1", "--prompts", "0", "--device", "cpu"]),
    ]:
        code = call(command, str(checkpoint), *extra)
        out = capsys.readouterr()
        assert_one_error(prog, code, EXIT_CHECKPOINT, out.err, "trainer.pt")
        assert out.out == ""  # nothing on stdout (where generated text goes)
    assert tree_digest(checkpoint) == before  # read, never repaired or deleted
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing_prompt_file", EXIT_USAGE),
        ("binary_prompt_file", EXIT_USAGE),
        ("bad_temperature", EXIT_USAGE),
        ("no_model", EXIT_CHECKPOINT),
    ],
)
def test_generate_arguments(case, expected, checkpoint, tmp_path, capsys):
    model, extra = str(checkpoint), ["--prompt", "x"]
    if case == "missing_prompt_file":
        extra, mention = ["--prompt-file", str(tmp_path / "nope.txt")], "nope.txt"
    elif case == "binary_prompt_file":
        (tmp_path / "b.bin").write_bytes(b"\xff\xfe\x00garbage")
        extra, mention = ["--prompt-file", str(tmp_path / "b.bin")], "b.bin"
    elif case == "bad_temperature":
        extra, mention = ["--prompt", "x", "--temperature", "-1"], "temperature"
    else:
        model, mention = str(tmp_path / "no_model"), "no_model"
    code = call(generate, model, *extra, "--device", "cpu")
    out = capsys.readouterr()
    assert_one_error("mtp-generate", code, expected, out.err, mention)
    assert out.out == ""


def test_export_out_naming_a_file(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_text("precious")
    code = call(export, str(checkpoint), "--out", str(out))
    assert_one_error("mtp-export", code, EXIT_USAGE, capsys.readouterr().err, str(out))
    assert out.read_text() == "precious"


def test_eval_bad_data(checkpoint, tmp_path, capsys):
    shard = tmp_path / "held_out.tar"
    shard.write_bytes(b"this is not a tar archive" * 40)
    for data, mention in [(tmp_path / "absent.tar", "absent.tar"), (shard, "held_out.tar")]:
        code = call(evaluate, str(checkpoint), "--data", str(data), "--prompts", "0", "--device", "cpu")
        assert_one_error("mtp-eval", code, EXIT_DATA, capsys.readouterr().err, mention)


def test_debug_shows_the_traceback(checkpoint, tmp_path):
    with pytest.raises(Exception, match="nope.txt"):
        generate([str(checkpoint), "--prompt-file", str(tmp_path / "nope.txt"), "--debug"])


# -- plot and submit ------------------------------------------------------------------------------------
def test_plot_and_submit(tmp_path, capsys):
    code = call(plot, str(tmp_path / "no_run"))
    assert_one_error("mtp-plot", code, EXIT_USAGE, capsys.readouterr().err, "no_run")
    for args, mention in [
        (["--dry-run", "slurm.nodes=0"], "slurm.nodes"),
        (["--dry-run", "slurm.typo=1"], "typo"),
        (["--dry-run", "+trainer.typo=1"], "trainer.typo"),
        (["--dry-run", "mtp.n=0"], "mtp.n"),
    ]:
        code = call(submit, *args, f"trainer.run_dir={tmp_path / 'run'}")
        assert_one_error("mtp-submit", code, EXIT_USAGE, capsys.readouterr().err, mention)


# -- mtp-train --------------------------------------------------------------------------------------------
def train_cli(*overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return run(cli(*overrides), env=clean_env(WANDB_MODE="disabled"), timeout=timeout)


@pytest.mark.parametrize(
    "override,mention",
    [("+trainer.typo=1", "trainer.typo"), ("model=nope", "model/nope"), ("trainer.steps=many", "steps")],
)
def test_train_config_errors(override, mention, tmp_path):
    r = train_cli(override, f"trainer.run_dir={tmp_path / 'run'}")
    assert_one_error("mtp-train", r.returncode, EXIT_USAGE, r.stderr, mention)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def shards(synthetic_source, tmp_path_factory) -> dict[str, object]:
    """Pre-built shards of the synthetic corpus (a private copy per module: the tests damage them)."""
    from mtp_pretrain.data.corpus import prepare_corpus

    corpus = prepare_corpus([synthetic_source], tmp_path_factory.mktemp("cache"), 300, max_docs_per_shard=5)
    root = tmp_path_factory.mktemp("shards")
    copy = [Path(shutil.copy(u, root)) for u in [*corpus.train_urls, *corpus.val_urls]]
    return {"train": copy[:-1], "val": copy[-1:], "tokenizer": corpus.tokenizer_path}


def shard_overrides(
    shards: dict, run_dir: Path, train: list[Path], val: list[Path], *extra: str
) -> list[str]:
    urls = ", ".join(str(u) for u in train)
    return [
        f"data.datasets=[{{urls: [{urls}]}}]",
        f"data.val_urls=[{', '.join(str(u) for u in val)}]",
        f"data.tokenizer={shards['tokenizer']}",
        "model.num_layers=3",
        "model.hidden_size=32",
        "model.num_attention_heads=2",
        "model.seq_len=16",
        "mtp.n=2",
        "trainer.micro_batch_size=2",
        "trainer.steps=4",
        "trainer.val_every=2",
        "trainer.val_batches=1",
        f"trainer.run_dir={run_dir}",
        "logging.log_every=1",
        *extra,
    ]


def test_train_missing_val_shard_fails_before_the_first_step(shards, tmp_path):
    missing = tmp_path / "val-not-there.tar"
    run_dir = tmp_path / "run"
    r = train_cli(*shard_overrides(shards, run_dir, shards["train"], [missing]))
    assert_one_error("mtp-train", r.returncode, EXIT_DATA, r.stderr, str(missing))
    assert "step 1" not in r.stdout and not (run_dir / "checkpoints").exists()


def test_train_damaged_shard_read_by_a_worker_is_one_line(shards, tmp_path):
    """data.on_error=raise: shards cut mid-way pass the start-up check (their first member is whole) and are
    met inside a DataLoader worker; one line naming the shard. data.on_error=skip trains through them,
    counting each."""
    train = [tmp_path / p.name for p in shards["train"]]
    for src, dst in zip(shards["train"], train, strict=True):
        data = src.read_bytes()
        dst.write_bytes(data[: len(data) // 2 + 7])  # inside a member past the first
    more = ("trainer.steps=30", "trainer.micro_batch_size=4")  # past the first shard's damage
    r = train_cli(
        *shard_overrides(shards, tmp_path / "run", train, shards["val"], "data.on_error=raise", *more)
    )
    line = assert_one_error("mtp-train", r.returncode, EXIT_DATA, r.stderr, "truncated")
    assert any(p.name in line for p in train), line
    r = train_cli(*shard_overrides(shards, tmp_path / "run2", train, shards["val"], *more))
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert max(rec.get("data/shards_skipped", 0) for rec in records) >= 1


def test_train_explicit_corrupt_checkpoint(shards, checkpoint, tmp_path):
    flip_byte(checkpoint / "trainer.pt")
    before = tree_digest(checkpoint)
    r = train_cli(
        *shard_overrides(
            shards, tmp_path / "run", shards["train"], shards["val"], f"trainer.resume={checkpoint}"
        )
    )
    assert_one_error("mtp-train", r.returncode, EXIT_CHECKPOINT, r.stderr, "trainer.pt")
    assert tree_digest(checkpoint) == before


def test_train_run_dir_held_by_another_job(shards, tmp_path):
    from mtp_pretrain.run_lock import RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = RunLock(run_dir).acquire()  # this test process stands in for a running job
    try:
        r = train_cli(*shard_overrides(shards, run_dir, shards["train"], shards["val"]))
    finally:
        lock.release()
    assert_one_error("mtp-train", r.returncode, EXIT_USAGE, r.stderr, "in use", f"pid {os.getpid()}")
    assert not (run_dir / "checkpoints").exists()


def test_two_ranks_one_damaged_shard_both_stop(shards, tmp_path):
    """Under torchrun the rank that meets the damage exits with its line and status; the launcher stops the
    other rank (none hangs) and passes the status on in one line of its own."""
    train = [tmp_path / p.name for p in shards["train"]]
    for src, dst in zip(shards["train"], train, strict=True):
        data = src.read_bytes()
        dst.write_bytes(data[: len(data) // 2 + 7])
    overrides = shard_overrides(
        shards,
        tmp_path / "run",
        train,
        shards["val"],
        "data.on_error=raise",
        "trainer.steps=30",
        "trainer.micro_batch_size=4",
    )
    r = run(
        ["bash", "launch/torchrun.sh", "2", *overrides], env=clean_env(WANDB_MODE="disabled"), timeout=240
    )
    assert r.returncode == EXIT_DATA, r.stderr
    lines = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert any(line.startswith("mtp-train: error: ") and "truncated" in line for line in lines), r.stderr
    assert any(line.startswith("torchrun: error: ") and f"status {EXIT_DATA}" in line for line in lines), (
        r.stderr
    )
    assert "Traceback" not in r.stderr, r.stderr
