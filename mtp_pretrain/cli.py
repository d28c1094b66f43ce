"""Entry points: `mtp-train` (Hydra app; also `python -m mtp_pretrain.cli`), shard and tokenizer tools.

Every command reports an expected failure (bad config, data, file or checkpoint; see errors.py for the exit
statuses) as one ``<command>: error: ...`` line, whenever it happens; ``--debug`` (or ``HYDRA_FULL_ERROR=1``
for mtp-train) shows the traceback. Whatever can be checked before the first training step is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mtp_pretrain.config import CONF_DIR, register_configs, to_config
from mtp_pretrain.errors import EXIT_PREEMPTED, MTPError, UsageError, debug_requested, fail, report, reported
from mtp_pretrain.processes import exit_with_launcher


def _quiet_libraries() -> None:
    """Silence known, harmless library chatter so the progress lines stay readable."""
    import logging
    import warnings

    logging.getLogger("megatron").setLevel(logging.WARNING)
    for message in (
        "The .grad attribute of a Tensor that is not a leaf",  # megatron's zero_grad on shard views
        ".*is deprecated. Please use",  # torch.distributed collectives megatron still calls
        "Apex is not installed",
        "Transformer Engine and Apex are not installed",
    ):
        warnings.filterwarnings("ignore", message=message)


def _parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _train_failed(error: Exception, setup: bool) -> None:
    """Report an expected failure of mtp-train with one line and its exit status, or re-raise (a bug, or
    tracebacks asked for). During set-up a ValueError/OSError is bad input too (a value of the wrong type,
    an unreadable file). Under torchrun the rank exits at once, without clean-up that could wait on peers
    inside a collective; the launcher then stops the other ranks. A rank whose peer failed first sees a
    distributed error: reported as the consequence it is (status 1), not as a traceback."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    expected = isinstance(error, MTPError) or (setup and isinstance(error, (ValueError, OSError)))
    # NCCL raises DistBackendError; gloo a RuntimeError "Connection closed/reset by peer"
    lost_peer = isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and "by peer" in str(error)
    )
    if not expected and world > 1 and lost_peer:
        # gloo's first sentence, without its source location
        why = str(error).split(". ")[0].rpartition("] ")[2]
        error = MTPError(f"rank {dist.get_rank()} lost its peers ({why}); see the failed rank's error above")
        error.exit_code, expected = 1, True
    if not expected or debug_requested():
        raise error
    if world == 1:
        fail("mtp-train", error)
    report("mtp-train", error)
    sys.stdout.flush()
    os._exit(getattr(error, "exit_code", 2))


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def _train_app(raw: DictConfig) -> None:
    _quiet_libraries()  # first: megatron warns and logs while the imports below load it
    with reported("mtp-train", also=(ValueError,)):  # ValueError: a config value of the wrong type
        cfg = to_config(raw)  # before the heavy imports: a bad config is reported within a second
    from mtp_pretrain import parallel
    from mtp_pretrain.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg)  # every input checked here, before the first step
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 (re-raised unless expected)
        _train_failed(e, setup=trainer is None)
    if result.stopped is not None:
        parallel.destroy_distributed()
        sys.exit(EXIT_PREEMPTED)  # saved: the launcher requeues and the run resumes
    if parallel.is_logging_rank():
        print(f"done: {result.step} steps in {result.run_dir}")
        print(f"  checkpoint: {result.checkpoint}")
        print(f"  wandb run:  {result.paths.get('wandb') or '(disabled)'}")
        print(f"  loss plot:  {result.paths.get('plot') or '(disabled)'}")
    parallel.destroy_distributed()


def _hydra_error(e: Exception) -> UsageError:
    """Hydra's multi-line composition error as one line; its cause holds the detail."""
    detail = e.__cause__ if e.__cause__ is not None and not isinstance(e, MTPError) else None
    cause = f": {str(detail).splitlines()[0]}" if detail else ""
    return UsageError(f"{e}{cause}")


def train() -> None:
    exit_with_launcher()  # under torchrun: this rank dies with its launcher, even if that is SIGKILLed
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mtp_pretrain.config import compose_train_config

    register_configs()
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):  # plain overrides (no --cfg, --multirun, ...): compose
        try:  # them first, so that a bad override is one line too (Hydra's own report spans several)
            compose_train_config(args)
        except (HydraException, OmegaConfBaseException) as e:
            fail("mtp-train", _hydra_error(e))
        except ValueError as e:  # ConfigError, or a value of the wrong type
            fail("mtp-train", e)
    _train_app()


def make_shards(argv: list[str] | None = None) -> None:
    """mtp-make-shards SOURCE... --out DIR: documents from files/dirs/JSONL into webdataset tar shards."""
    from mtp_pretrain.data.shards import MANIFEST, iter_source_documents, write_shards

    p = _parser("mtp-make-shards", make_shards.__doc__)
    p.add_argument("sources", nargs="+", help="directories, .txt, .jsonl or .jsonl.gz files")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--prefix", default="shard")
    p.add_argument(
        "--shard-size-mb", type=float, default=256, help="target shard size (a new shard starts above it)"
    )
    p.add_argument("--docs-per-shard", type=int, default=10**9, help="at most this many documents per shard")
    p.add_argument("--suffixes", default=".py,.txt,.md", help="file suffixes taken from directories")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs")
    p.add_argument("--tokenizer", help="tokenizer.json: store pre-tokenized token arrays instead of text")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (with --tokenizer)"
    )
    a = p.parse_args(argv)
    with reported(
        "mtp-make-shards", also=(ValueError, OSError, EOFError), debug=a.debug
    ):  # EOFError: a cut .gz input
        docs = iter_source_documents(
            a.sources, suffixes=tuple(a.suffixes.split(",")), jsonl_text_field=a.text_field
        )
        shards = write_shards(
            docs,
            a.out,
            prefix=a.prefix,
            max_docs_per_shard=a.docs_per_shard,
            max_bytes_per_shard=int(a.shard_size_mb * 2**20),
            tokenizer_path=a.tokenizer,
            workers=a.workers,
            progress=True,
        )
    manifest = json.loads((Path(a.out) / MANIFEST).read_text())
    tokens = f", {manifest['num_tokens']} tokens" if manifest["num_tokens"] is not None else ""
    print(
        f"wrote {len(shards)} shard(s), {manifest['num_samples']} documents{tokens} to {a.out} (+ {MANIFEST})"
    )


def train_tokenizer(argv: list[str] | None = None) -> None:
    """mtp-train-tokenizer SOURCE... --out tokenizer.json --vocab-size N: byte-level BPE, offline."""
    from mtp_pretrain.data.shards import iter_source_documents
    from mtp_pretrain.data.tokenizer import train_tokenizer as train_bpe

    p = _parser("mtp-train-tokenizer", train_tokenizer.__doc__)
    p.add_argument("sources", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--suffixes", default=".py,.txt,.md", help="file suffixes taken from directories")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs")
    a = p.parse_args(argv)
    with reported("mtp-train-tokenizer", also=(ValueError, OSError, EOFError), debug=a.debug):
        docs = iter_source_documents(
            a.sources, suffixes=tuple(a.suffixes.split(",")), jsonl_text_field=a.text_field
        )
        texts = (d["text"] for d in docs)
        tok = train_bpe(texts, a.vocab_size, a.out)
    print(f"wrote {a.out} (vocab {tok.get_vocab_size()})")


def export(argv: list[str] | None = None) -> None:
    """mtp-export CHECKPOINT --out DIR: a Hugging Face Llama directory (trunk + head 1; extra heads aside)."""
    _quiet_libraries()
    p = _parser("mtp-export", export.__doc__)
    p.add_argument("checkpoint", help="a step_XXXXXXXX directory (any parallel layout)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from mtp_pretrain.export import export_checkpoint

    with reported("mtp-export", also=(OSError,), debug=a.debug):  # OSError: an unwritable --out
        out = export_checkpoint(a.checkpoint, a.out)
    print(f"exported {a.checkpoint} to {out}")


def plot(argv: list[str] | None = None) -> None:
    """mtp-plot RUN_DIR [RUN_DIR ...]: per-head train (solid) and val (dashed) loss curves from metrics.jsonl;
    several runs are compared head by head, one colour per run (e.g. n=1 against n=4)."""
    p = _parser("mtp-plot", plot.__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    p.add_argument(
        "--out", help="PNG to write (default: RUN_DIR/loss_curves.png; several: ./loss_curves_compare.png)"
    )
    p.add_argument("--logy", action="store_true", help="log-scale loss axis")
    p.add_argument("--title", help="figure title")
    a = p.parse_args(argv)
    from mtp_pretrain.metrics.plot import COMPARE_FILE, PLOT_FILE, load_runs, plot_runs

    out = Path(a.out or (Path(a.run_dirs[0]) / PLOT_FILE if len(a.run_dirs) == 1 else COMPARE_FILE))
    with reported(
        "mtp-plot", also=(ValueError, OSError), debug=a.debug
    ):  # OSError: a missing metrics.jsonl, bad --out
        if plot_runs(load_runs(a.run_dirs), out, title=a.title, logy=a.logy) is None:
            raise ValueError(f"no loss records in {', '.join(a.run_dirs)}")
    print(f"wrote {out}")


def submit(argv: list[str] | None = None) -> None:
    """mtp-submit [--dry-run] [slurm=PRESET] [slurm.KEY=VALUE ...] [training overrides ...]: one SLURM job
    (see slurm.py); the request composes conf/submit.yaml, the training overrides conf/train.yaml."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from mtp_pretrain.config import compose, compose_train_config
    from mtp_pretrain.slurm import SubmitConfig, SubmitError, sbatch_script, split_overrides
    from mtp_pretrain.slurm import submit as sbatch_submit

    p = _parser("mtp-submit", submit.__doc__)
    p.add_argument("--dry-run", action="store_true", help="write <run_dir>/slurm/job.sbatch, do not submit")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        request_args, train_args = split_overrides(a.overrides)
        cfg = compose_train_config(train_args)  # the job's config, checked now
        # as plain values into the schema: Hydra lets +slurm.KEY=... append a key SlurmConfig lacks
        raw = OmegaConf.to_container(compose(request_args, config_name="submit"))
        request = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SubmitConfig), raw))
        run_dir = Path(cfg.trainer.run_dir).resolve()
        slurm = request.slurm  # type: ignore[union-attr]
        script = sbatch_script(slurm, run_dir, train_args, cfg.trainer.stop_file)
        print(sbatch_submit(script, run_dir, dry_run=a.dry_run))
    except (HydraException, OmegaConfBaseException, ValueError, SubmitError, KeyError, OSError) as e:
        if a.debug:
            raise
        fail("mtp-submit", _hydra_error(e) if isinstance(e, (HydraException, OmegaConfBaseException)) else e)


if __name__ == "__main__":  # dist_checkpointing's helper process re-imports __main__: keep this guard
    train()
