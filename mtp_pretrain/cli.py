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

from mtp_pretrain.config import CONF_DIR, ConfigError, register_configs, to_config


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
    try:
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
    except (ValueError, FileNotFoundError) as e:
        print(f"mtp-make-shards: error: {e}", file=sys.stderr)
        sys.exit(2)
    manifest = json.loads((Path(a.out) / MANIFEST).read_text())
    tokens = f", {manifest['num_tokens']} tokens" if manifest["num_tokens"] is not None else ""
    print(
        f"wrote {len(shards)} shard(s), {manifest['num_samples']} documents{tokens} to {a.out} (+ {MANIFEST})"
    )


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
        docs = iter_source_documents(
            a.sources, suffixes=tuple(a.suffixes.split(",")), jsonl_text_field=a.text_field
        )
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


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", help="a run dir (its newest checkpoint), a step_XXXXXXXX checkpoint or an mtp-export dir"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--tokenizer", help="tokenizer.json to check against the model's (default: the model's own)"
    )


def _load(a: argparse.Namespace, prog: str):  # noqa: ANN202
    import torch

    from mtp_pretrain.checkpoint import CheckpointError
    from mtp_pretrain.inference.weights import load_model

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return load_model(a.model, getattr(torch, a.dtype), device, a.tokenizer)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def generate(argv: list[str] | None = None) -> None:
    """mtp-generate MODEL [--prompt TEXT ...|--prompt-file F ...|stdin]: continue prompts, streaming the
    first; greedy decoding is self-speculative with the MTP heads (same tokens, fewer forward passes)."""
    _quiet_libraries()
    from mtp_pretrain.inference.generate import (
        MIN_TOKENS_PER_FORWARD,
        PROBE_FORWARDS,
        Sampling,
        generate_text,
    )

    p = argparse.ArgumentParser(prog="mtp-generate", description=generate.__doc__)
    _model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument(
        "--prompt-file", action="append", default=[], help="a file whose text is one prompt (repeatable)"
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-speculative", action="store_true", help="plain greedy: one forward pass per token")
    p.add_argument(
        "--min-tokens-per-forward",
        type=float,
        default=MIN_TOKENS_PER_FORWARD,
        help=f"stop drafting after {PROBE_FORWARDS} forwards that gained fewer tokens per forward "
        "(0: always draft)",
    )
    p.add_argument("--stats-json", help="write the decoding statistics here")
    a = p.parse_args(argv)
    prompts = list(a.prompt) + [Path(f).read_text() for f in a.prompt_file]
    if not prompts:
        prompts = [sys.stdin.read()]
    try:
        sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed)
    except ValueError as e:
        print(f"mtp-generate: error: {e}", file=sys.stderr)
        sys.exit(2)
    model = _load(a, "mtp-generate")

    def stream(row: int, piece: str) -> None:  # the first prompt streams; a batch's others print at the end
        if row == 0:
            sys.stdout.write(piece)
            sys.stdout.flush()

    try:
        texts, stats = generate_text(
            model, prompts, a.max_new_tokens, sampling, not a.no_speculative, stream, a.min_tokens_per_forward
        )
    except ValueError as e:
        print(f"\nmtp-generate: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write("\n")
    for i, text in enumerate(texts[1:], start=1):
        print(f"--- prompt {i} ---\n{text}")
    acc = " ".join(f"{k} {v:.2f}" for k, v in stats.as_dict()["acceptance_per_head"].items())
    print(
        f"[{'self-speculative' if stats.speculative else 'plain'}] {stats.new_tokens} tokens, {len(prompts)} prompt(s), "
        f"{stats.tokens_per_second:.1f} tok/s, {stats.tokens_per_forward:.2f} tokens/forward"
        + (f", acceptance {acc}" if acc else "")
        + (
            f"; drafting stopped after forward {stats.drafting_stopped_at} (it did not pay)"
            if stats.drafting_stopped_at
            else ""
        ),
        file=sys.stderr,
    )
    if a.stats_json:
        Path(a.stats_json).write_text(json.dumps(stats.as_dict(), indent=2))


def evaluate(argv: list[str] | None = None) -> None:
    """mtp-eval MODEL [--data SHARDS ...]: per-head held-out loss, perplexity, top-1 accuracy and the
    self-speculative acceptance, as a table and JSON."""
    _quiet_libraries()
    p = argparse.ArgumentParser(prog="mtp-eval", description=evaluate.__doc__)
    _model_args(p)
    p.add_argument(
        "--data", nargs="*", help="held-out shards/dirs/patterns (default: the run's validation set)"
    )
    p.add_argument(
        "--mask-doc-boundaries", action="store_true", help="with --data: mask targets across documents"
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--prompts", type=int, default=8, help="held-out prompts for the acceptance statistics (0: skip)"
    )
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", help="write the results here (default: print them)")
    a = p.parse_args(argv)
    from mtp_pretrain.data.datasets import Dataset
    from mtp_pretrain.data.shard_reader import ShardReadError
    from mtp_pretrain.inference.evaluate import (
        acceptance,
        heldout_metrics,
        read_batches,
        run_validation_data,
        table,
    )

    model = _load(a, "mtp-eval")
    try:
        if a.data:
            datasets, mask, field = [Dataset.of(a.data, name="eval")], a.mask_doc_boundaries, a.text_field
        else:
            datasets, mask, field = run_validation_data(model)
        batches = read_batches(model, datasets, a.batches, a.batch_size, field)
        metrics = heldout_metrics(model, batches, mask)
    except (ValueError, FileNotFoundError, ShardReadError) as e:
        print(f"mtp-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    result = {"model": str(model.source), "heads": metrics}
    if a.prompts:
        result["decoding"] = acceptance(model, batches, a.prompts, a.prompt_tokens, a.new_tokens)
    print(table(metrics, model.decoder.cfg.mtp_heads))
    if "decoding" in result and result["decoding"]:
        d = result["decoding"]
        acc = " ".join(f"{k} {v:.2f}" for k, v in d["acceptance_per_head"].items())
        print(
            f"self-speculative: {d['tokens_per_forward']:.2f} tokens/forward, acceptance {acc or '-'}, "
            f"identical to greedy: {d['identical_to_greedy']}"
        )
    text = json.dumps(result, indent=2)
    if a.json:
        Path(a.json).write_text(text)
    else:
        print(text)


def plot(argv: list[str] | None = None) -> None:
    """mtp-plot RUN_DIR [RUN_DIR ...]: per-head train (solid) and val (dashed) loss curves from metrics.jsonl;
    several runs are compared head by head, one colour per run (e.g. n=1 against n=4)."""
    p = argparse.ArgumentParser(prog="mtp-plot", description=plot.__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    p.add_argument(
        "--out", help="PNG to write (default: RUN_DIR/loss_curves.png; several: ./loss_curves_compare.png)"
    )
    p.add_argument("--logy", action="store_true", help="log-scale loss axis")
    p.add_argument("--title", help="figure title")
    a = p.parse_args(argv)
    from mtp_pretrain.metrics.plot import COMPARE_FILE, PLOT_FILE, load_runs, plot_runs

    out = Path(a.out or (Path(a.run_dirs[0]) / PLOT_FILE if len(a.run_dirs) == 1 else COMPARE_FILE))
    try:
        if plot_runs(load_runs(a.run_dirs), out, title=a.title, logy=a.logy) is None:
            raise ValueError(f"no loss records in {', '.join(a.run_dirs)}")
    except (ValueError, OSError) as e:  # OSError: a missing metrics.jsonl, an unwritable --out
        print(f"mtp-plot: error: {e}", file=sys.stderr)
        sys.exit(2)
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

    p = argparse.ArgumentParser(prog="mtp-submit", description=submit.__doc__)
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
    except (ValueError, SubmitError, KeyError, HydraException, OmegaConfBaseException) as e:
        # one line, as every other error: Hydra's messages span several, their cause holds the detail
        detail = e.__cause__ if isinstance(e, HydraException) else None
        cause = f": {str(detail).splitlines()[0]}" if detail else ""
        print(f"mtp-submit: error: {' '.join(f'{e}{cause}'.split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # dist_checkpointing's helper process re-imports __main__: keep this guard
    train()
