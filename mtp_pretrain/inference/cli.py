"""Inference entry points: ``mtp-generate`` (self-speculative decoding) and ``mtp-eval`` (held-out metrics
per head). Errors are reported as every command reports them (mtp_pretrain/errors.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtp_pretrain.cli import _parser, _quiet_libraries
from mtp_pretrain.errors import MTPError, UsageError, fail, reported


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

    from mtp_pretrain.inference.weights import load_model

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with reported(prog, also=(ValueError, OSError), debug=a.debug):
        return load_model(a.model, getattr(torch, a.dtype), device, a.tokenizer)


def _read_prompt(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason})"
        raise UsageError(f"--prompt-file {path}: {why}; give a UTF-8 text file") from e


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

    p = _parser("mtp-generate", generate.__doc__)
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
    with reported("mtp-generate", also=(ValueError,), debug=a.debug):
        prompts = list(a.prompt) + [_read_prompt(f) for f in a.prompt_file]
        sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed)
    if not prompts:
        prompts = [sys.stdin.read()]
    model = _load(a, "mtp-generate")

    def stream(row: int, piece: str) -> None:  # the first prompt streams; a batch's others print at the end
        if row == 0:
            sys.stdout.write(piece)
            sys.stdout.flush()

    try:
        texts, stats = generate_text(
            model, prompts, a.max_new_tokens, sampling, not a.no_speculative, stream, a.min_tokens_per_forward
        )
    except (ValueError, MTPError) as e:
        sys.stdout.write("\n")  # end the streamed text's line
        if a.debug:
            raise
        fail("mtp-generate", e)
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
    p = _parser("mtp-eval", evaluate.__doc__)
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
    from mtp_pretrain.inference.evaluate import (
        acceptance,
        heldout_metrics,
        read_batches,
        run_validation_data,
        table,
    )

    model = _load(a, "mtp-eval")
    with reported("mtp-eval", also=(ValueError, OSError), debug=a.debug):
        if a.data:
            datasets, mask, field = [Dataset.of(a.data, name="eval")], a.mask_doc_boundaries, a.text_field
        else:
            datasets, mask, field = run_validation_data(model)
        batches = read_batches(model, datasets, a.batches, a.batch_size, field)
        metrics = heldout_metrics(model, batches, mask)
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
