"""Data-loader throughput vs the training step's consumption, in tokens/s, measured in one run.

The config is the real `make train` recipe (`+experiment=cpu_demo`: tiny model, mtp n=4, micro batch 16,
seq 128, the Python-stdlib corpus at vocab 1024), composed with Hydra exactly as `mtp-train` does; extra
Hydra overrides (`model=small`, `trainer.micro_batch_size=8`, ...) go after the options and apply to both
parts.

Loader. The project's `BatchLoader` over the corpus's training shards, once with the raw-text shards of
the corpus cache (tokenized while reading) and once with pre-tokenized copies of the same documents
(`<key>.tokens.npy` members, written into a temporary directory first), each with `--workers` DataLoader
workers (0 = read in this process). The first batch (worker start-up, first shard) is timed on its own;
the rate is then taken over the following batches for at least `--seconds` and `--min-batches`.

Consumption. The real `Trainer` for `--train-steps` steps (no validation; its closing checkpoint is not
timed), reading the same training shards with its default loader; the first `--warmup-steps` steps are
excluded. Its rate is the trainer's own per-step `tokens_per_s` (`metrics.jsonl`), combined as total
tokens / total time over the timed steps.

Tokens are counted as the trainer counts them: micro batch x seq_len per batch (each row carries
seq_len + n tokens), so the ratio loader / consumption is loader batches/s over training micro-batches/s.
Target: every loader configuration >= 20x the consumption, so the data path never stalls the step. The
figures are ratios measured on this machine in one run; the absolute rates mean nothing elsewhere.

    python tools/bench_data.py [--workers 0,1,2 --seconds 3 --train-steps 8 --json PATH] [HYDRA_OVERRIDES ...]
    python tools/bench_data.py --source DIR --cache-dir /tmp/c --vocab-size 300 --docs-per-shard 5
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from mtp_pretrain.bench.options import bench_parser, report
from mtp_pretrain.config import compose_train_config

TARGET = 20.0  # loader tokens/s >= TARGET x training consumption


def _documents(urls: list[str]):
    """The documents of text shards, read back with plain webdataset, as write_shards takes them."""
    import webdataset as wds

    for url in urls:
        for sample in wds.WebDataset(url, shardshuffle=False):
            meta = json.loads(sample["json"]) if "json" in sample else {}
            yield {"key": sample["__key__"], "text": sample["txt"].decode("utf-8"), "meta": meta}


def write_token_shards(
    urls: list[str], tokenizer_path: Path, out_dir: Path, docs_per_shard: int
) -> list[str]:
    """Pre-tokenized copies of the text shards ``urls`` (same documents, same shard boundaries)."""
    from mtp_pretrain.data.shards import write_shards

    workers = max(1, min(2, len(os.sched_getaffinity(0))))
    paths = write_shards(
        _documents(urls),
        out_dir,
        max_docs_per_shard=docs_per_shard,
        tokenizer_path=tokenizer_path,
        workers=workers,
    )
    return [str(p) for p in paths]


def measure_loader(urls, tokenizer_path, cfg, workers: int, seconds: float, min_batches: int) -> dict:
    """Start-up time and steady rate of one BatchLoader configuration."""
    from mtp_pretrain.data.datasets import Dataset
    from mtp_pretrain.data.loader import BatchLoader

    t = cfg.trainer
    sample_len = cfg.model.seq_len + cfg.mtp.n
    t0 = time.perf_counter()
    loader = BatchLoader(
        [Dataset.of(urls)],
        tokenizer_path,
        t.micro_batch_size,
        sample_len,
        seed=t.seed,
        num_workers=workers,
        on_error="raise",
    )
    try:
        first = next(loader)
        startup = time.perf_counter() - t0
        if tuple(first.shape) != (t.micro_batch_size, sample_len):
            raise RuntimeError(
                f"loader batch shape {tuple(first.shape)} != {(t.micro_batch_size, sample_len)}"
            )
        batches = 0
        t1 = time.perf_counter()
        while True:
            next(loader)
            batches += 1
            elapsed = time.perf_counter() - t1
            if batches >= min_batches and elapsed >= seconds:
                break
    finally:
        loader.close()
    tokens = batches * t.micro_batch_size * cfg.model.seq_len
    return {"startup_s": startup, "batches": batches, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def measure_consumption(overrides: list[str], steps: int, warmup: int) -> dict:
    """The real Trainer for ``steps`` steps; tokens/s over the steps after ``warmup``."""
    from mtp_pretrain.cli import _quiet_libraries
    from mtp_pretrain.metrics import JSONL_FILE

    _quiet_libraries()
    from mtp_pretrain.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench_data_run.") as run_dir:
        run_overrides = [f"trainer.steps={steps}", "trainer.val_every=0", "trainer.save_every=0"]
        run_overrides += [f"trainer.run_dir={run_dir}", "trainer.resume=none", "logging.wandb_mode=disabled"]
        cfg = compose_train_config([*overrides, *run_overrides, "logging.plot=false", "logging.log_every=1"])
        console = io.StringIO()  # the trainer's per-step lines; shown only if it fails
        try:
            with contextlib.redirect_stdout(console):
                trainer = Trainer(cfg)
                trainer.fit()
        except BaseException:
            sys.stderr.write(console.getvalue())
            raise
        recs = [json.loads(line) for line in (Path(run_dir) / JSONL_FILE).read_text().splitlines() if line]
        del trainer
        gc.collect()
    t = cfg.trainer
    tokens_per_step = t.micro_batch_size * cfg.model.seq_len * t.grad_accum  # dp = 1: one process
    rates = {r["step"]: r["tokens_per_s"] for r in recs if r.get("split") == "train" and "tokens_per_s" in r}
    timed = [rates[s] for s in sorted(rates) if s > warmup]
    if not timed:
        raise RuntimeError(
            f"no training step after the {warmup} warm-up steps was recorded ({sorted(rates)})"
        )
    step_s = [tokens_per_step / r for r in timed]
    return {
        "steps": len(timed),
        "tokens_per_step": tokens_per_step,
        "step_s_mean": sum(step_s) / len(step_s),
        "tokens_per_s": len(timed) * tokens_per_step / sum(step_s),
    }


def run(args: argparse.Namespace) -> dict:
    from mtp_pretrain import parallel
    from mtp_pretrain.data.corpus import prepare_corpus

    overrides = ["+experiment=cpu_demo", *args.overrides]  # the main job's config (make train)
    if args.source:
        overrides.append("data.source=[" + ",".join(f"'{Path(s).resolve()}'" for s in args.source) + "]")
    given = {
        "data.cache_dir": args.cache_dir,
        "data.vocab_size": args.vocab_size,
        "data.docs_per_shard": args.docs_per_shard,
    }
    overrides += [f"{key}={value}" for key, value in given.items() if value is not None]
    cfg = compose_train_config(overrides)
    d = cfg.data
    if d.datasets:
        raise SystemExit("bench_data: measures the corpus built from data.source; data.datasets is set")
    corpus = prepare_corpus(d.source, d.cache_dir, d.vocab_size, d.val_shards, d.docs_per_shard)
    n_shards = len(corpus.train_urls)
    workers = [w for w in args.workers if max(w, 1) <= n_shards]
    if len(workers) < len(args.workers):
        print(f"skipping workers {sorted(set(args.workers) - set(workers))}: only {n_shards} training shards")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_tokens.") as tmp:
        t0 = time.perf_counter()
        token_urls = write_token_shards(corpus.train_urls, corpus.tokenizer_path, Path(tmp), d.docs_per_shard)
        print(
            f"pre-tokenized {n_shards} training shards -> {len(token_urls)} "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        for content, urls in (("text", corpus.train_urls), ("tokens", token_urls)):
            for w in workers:
                r = measure_loader(urls, corpus.tokenizer_path, cfg, w, args.seconds, args.min_batches)
                rows.append({"content": content, "workers": w, **r})
                print(
                    f"  loader {content:<6} workers={w}: {r['tokens_per_s']:.0f} tokens/s "
                    f"({r['batches']} batches in {r['seconds']:.2f}s, start-up {r['startup_s']:.2f}s)"
                )

    consumption = measure_consumption(overrides, args.train_steps, args.warmup_steps)
    parallel.destroy_distributed()
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / consumption["tokens_per_s"]
        r["meets_target"] = r["ratio"] >= TARGET
    return {
        "config": {
            "model": cfg.model.preset,
            "mtp_n": cfg.mtp.n,
            "micro_batch_size": cfg.trainer.micro_batch_size,
            "seq_len": cfg.model.seq_len,
            "sample_len": cfg.model.seq_len + cfg.mtp.n,
            "vocab_size": d.vocab_size,
            "source": d.source or "python stdlib",
            "train_shards": n_shards,
            "trainer_num_workers": d.num_workers,
            "cpus": len(os.sched_getaffinity(0)),
        },
        "target_ratio": TARGET,
        "consumption": consumption,
        "rows": rows,
    }


def print_table(result: dict) -> None:
    c, cons = result["config"], result["consumption"]
    print(
        f"\ndata loader vs training consumption, measured in one run on this machine ({c['cpus']} CPUs): "
        f"model {c['model']}, n={c['mtp_n']}, B={c['micro_batch_size']}, T={c['seq_len']} "
        f"(rows of {c['sample_len']} tokens), vocab {c['vocab_size']}, {c['train_shards']} training shards"
    )
    print(
        f"training consumption: {cons['tokens_per_s']:.0f} tokens/s ({cons['steps']} timed steps, "
        f"{cons['step_s_mean']:.3f} s/step, {cons['tokens_per_step']} tokens/step, "
        f"trainer loader workers={c['trainer_num_workers']})"
    )
    print(
        f"{'content':<8} {'workers':>7} {'start-up s':>10} {'loader tokens/s':>16} {'x consumption':>14} "
        f"{f'>= {TARGET:.0f}x':>7}"
    )
    for r in result["rows"]:
        print(
            f"{r['content']:<8} {r['workers']:>7} {r['startup_s']:>10.2f} {r['tokens_per_s']:>16.0f} "
            f"{r['ratio']:>14.1f} {'yes' if r['meets_target'] else 'no':>7}"
        )
    met = sum(r["meets_target"] for r in result["rows"])
    print(f"target: loader >= {TARGET:.0f}x consumption; met by {met}/{len(result['rows'])} configurations")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    p = bench_parser(__doc__)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml (both parts)")
    p.add_argument("--workers", type=_int_list, default=[0, 1, 2], help="DataLoader workers, comma-separated")
    p.add_argument("--seconds", type=float, default=2.5, help="minimum timed seconds per loader row")
    p.add_argument("--min-batches", type=int, default=20, help="minimum timed batches per loader row")
    p.add_argument("--train-steps", type=int, default=8, help="training steps run (warm-up included)")
    p.add_argument("--warmup-steps", type=int, default=2, help="first training steps left out of the timing")
    p.add_argument(
        "--source", action="append", help="corpus source directory/file (repeatable); default stdlib"
    )
    p.add_argument("--cache-dir", help="corpus cache (data.cache_dir)")
    p.add_argument("--vocab-size", type=int, help="data.vocab_size")
    p.add_argument("--docs-per-shard", type=int, help="data.docs_per_shard")
    args = p.parse_args(argv)
    if args.train_steps <= args.warmup_steps:
        p.error("--train-steps must exceed --warmup-steps")
    if not args.workers or min(args.workers) < 0:
        p.error("--workers: non-negative integers, e.g. 0,1,2")
    return report(run(args), print_table, args.json)


if __name__ == "__main__":
    main()
