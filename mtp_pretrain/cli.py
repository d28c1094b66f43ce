"""Entry points: `mtp-train` (Hydra app; also `python -m mtp_pretrain.cli`), shard and tokenizer tools.

Set-up errors (bad config combination, missing or empty corpus, bad checkpoint) end the run with one
line naming the problem and exit status 2, before any training starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mtp_pretrain.config import ConfigError, register_configs, to_config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


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


EXIT_NONFINITE = 3  # training diverged; distinct from set-up errors (2) and a requeue request (75)


def _fail(message: str) -> None:
    print(f"mtp-train: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def _train_app(raw: DictConfig) -> None:
    _quiet_libraries()  # first: megatron warns and logs while the imports below load it
    try:
        cfg = to_config(raw)  # before the heavy imports: a bad config is reported within a second
    except ValueError as e:  # ConfigError, or a value of the wrong type
        _fail(str(e))
    from mtp_pretrain import parallel
    from mtp_pretrain.checkpoint import CheckpointError
    from mtp_pretrain.preemption import EXIT_PREEMPTED
    from mtp_pretrain.trainer import NonFiniteLossError, Trainer

    try:
        trainer = Trainer(cfg)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    try:
        result = trainer.fit()
    except NonFiniteLossError as e:
        print(f"mtp-train: error: {e}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    if result.stopped is not None:
        parallel.destroy_distributed()
        sys.exit(EXIT_PREEMPTED)  # saved: the launcher requeues and the run resumes
    if parallel.is_logging_rank():
        print(f"done: {result.step} steps in {result.run_dir}")
        print(f"  checkpoint: {result.checkpoint}")
        print(f"  wandb run:  {result.paths.get('wandb') or '(disabled)'}")
        print(f"  loss plot:  {result.paths.get('plot') or '(disabled)'}")
    parallel.destroy_distributed()


def train() -> None:
    register_configs()
    _train_app()


def make_shards(argv: list[str] | None = None) -> None:
    """mtp-make-shards SOURCE... --out DIR: documents from files/dirs/JSONL into webdataset tar shards."""
    from mtp_pretrain.data.shards import MANIFEST, iter_source_documents, write_shards

    p = argparse.ArgumentParser(prog="mtp-make-shards", description=make_shards.__doc__)
    p.add_argument("sources", nargs="+", help="directories, .txt, .jsonl or .jsonl.gz files")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--shard-size-mb", type=float, default=256, help="target shard size (a new shard starts above it)")
    p.add_argument("--docs-per-shard", type=int, default=10**9, help="at most this many documents per shard")
    p.add_argument("--suffixes", default=".py,.txt,.md", help="file suffixes taken from directories")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs")
    p.add_argument("--tokenizer", help="tokenizer.json: store pre-tokenized token arrays instead of text")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (with --tokenizer)")
    a = p.parse_args(argv)
    try:
        docs = iter_source_documents(a.sources, suffixes=tuple(a.suffixes.split(",")), jsonl_text_field=a.text_field)
        shards = write_shards(
            docs, a.out, prefix=a.prefix, max_docs_per_shard=a.docs_per_shard,
            max_bytes_per_shard=int(a.shard_size_mb * 2**20), tokenizer_path=a.tokenizer, workers=a.workers,
            progress=True,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"mtp-make-shards: error: {e}", file=sys.stderr)
        sys.exit(2)
    manifest = json.loads((Path(a.out) / MANIFEST).read_text())
    tokens = f", {manifest['num_tokens']} tokens" if manifest["num_tokens"] is not None else ""
    print(f"wrote {len(shards)} shard(s), {manifest['num_samples']} documents{tokens} to {a.out} (+ {MANIFEST})")


def train_tokenizer(argv: list[str] | None = None) -> None:
    """mtp-train-tokenizer SOURCE... --out tokenizer.json --vocab-size N: byte-level BPE, offline."""
    from mtp_pretrain.data.shards import iter_source_documents
    from mtp_pretrain.data.tokenizer import train_tokenizer as train_bpe

    p = argparse.ArgumentParser(prog="mtp-train-tokenizer", description=train_tokenizer.__doc__)
    p.add_argument("sources", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--suffixes", default=".py,.txt,.md", help="file suffixes taken from directories")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs")
    a = p.parse_args(argv)
    try:
        docs = iter_source_documents(a.sources, suffixes=tuple(a.suffixes.split(",")), jsonl_text_field=a.text_field)
        texts = (d["text"] for d in docs)
        tok = train_bpe(texts, a.vocab_size, a.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"mtp-train-tokenizer: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {a.out} (vocab {tok.get_vocab_size()})")




def export(argv: list[str] | None = None) -> None:
    """mtp-export CHECKPOINT --out DIR: a Hugging Face Llama directory (trunk + head 1; extra heads aside)."""
    _quiet_libraries()
    p = argparse.ArgumentParser(prog="mtp-export", description=export.__doc__)
    p.add_argument("checkpoint", help="a step_XXXXXXXX directory (any parallel layout)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from mtp_pretrain.checkpoint import CheckpointError
    from mtp_pretrain.export import export_checkpoint

    try:
        out = export_checkpoint(a.checkpoint, a.out)
    except CheckpointError as e:
        print(f"mtp-export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {a.checkpoint} to {out}")


def submit(argv: list[str] | None = None) -> None:
    """mtp-submit [--dry-run] [slurm.KEY=VALUE ...] [training overrides ...]: one SLURM job (see slurm.py)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mtp_pretrain.slurm import SlurmConfig, SubmitError, sbatch_script
    from mtp_pretrain.slurm import submit as sbatch_submit

    p = argparse.ArgumentParser(prog="mtp-submit", description=submit.__doc__)
    p.add_argument("--dry-run", action="store_true", help="write <run_dir>/slurm/job.sbatch, do not submit")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    slurm_args = [o.removeprefix("slurm.") for o in a.overrides if o.startswith("slurm.")]
    train_args = [o for o in a.overrides if not o.startswith("slurm.")]
    try:
        register_configs()
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = to_config(compose(config_name="train", overrides=train_args))  # the job's config, checked now
        slurm = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SlurmConfig), OmegaConf.from_dotlist(slurm_args)))
        run_dir = Path(cfg.trainer.run_dir).resolve()
        script = sbatch_script(slurm, run_dir, train_args, cfg.trainer.stop_file)  # type: ignore[arg-type]
        print(sbatch_submit(script, run_dir, dry_run=a.dry_run))
    except (ValueError, SubmitError, KeyError) as e:
        print(f"mtp-submit: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # dist_checkpointing's helper process re-imports __main__: keep this guard
    train()
