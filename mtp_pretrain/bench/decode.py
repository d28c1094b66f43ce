"""Decoding speed: plain greedy vs self-speculative (MTP heads draft, head 1 verifies), same run.

    python tools/bench_decode.py [--model outputs/tiny-n4] [--prompts 8 --prompt-tokens 32 --new-tokens 96]

Prompts are held-out code: the first tokens of rows of the run's validation shards (the Python standard
library for the main job). At batch 1 each prompt is decoded alone; at batch 8 all at once. Greedy and
speculative runs alternate, repeated ``--repeats`` times, and the best time of each counts (noise on a
shared machine only ever slows a run down). Prints tokens/s of both, their ratio, the mean tokens gained
per forward and the acceptance of each extra head (drafting never switched off), and checks the tokens
are identical. "default" is mtp-generate's behaviour: drafting stops when it does not pay. A fourth run
feeds the true greedy continuation as drafts ("perfect drafts"): every draft is accepted, so its speed-up
is the ceiling this machine and model shape allow; the gap to it is what the heads' quality costs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mtp_pretrain.bench.options import bench_parser, report
from mtp_pretrain.inference.evaluate import read_batches, run_validation_data
from mtp_pretrain.inference.generate import MIN_TOKENS_PER_FORWARD, generate
from mtp_pretrain.inference.weights import load_model


def _oracle(reference: list[list[int]], n: int):  # noqa: ANN202
    """Drafts that are always right (the greedy continuation itself): the speed-up ceiling of this
    machine and model when every draft is accepted, i.e. what better-trained heads could reach."""

    def drafts(generated: list[list[int]], proposed: torch.Tensor) -> torch.Tensor:
        out = proposed.clone()
        for b, done in enumerate(generated):
            truth = reference[b][len(done) : len(done) + n - 1]
            out[b, : len(truth)] = torch.tensor(truth)
        return out

    return drafts


def _decode(
    model,
    prompts: list[list[int]],
    batch: int,
    new_tokens: int,
    speculative: bool,
    reference: list | None = None,
    min_tokens_per_forward: float = 0.0,
) -> tuple[list, float, dict]:
    tokens, seconds, stats = [], 0.0, []
    n = model.decoder.cfg.mtp_heads
    for i in range(0, len(prompts), batch):
        draft_fn = _oracle(reference[i : i + batch], n) if reference is not None else None
        g = generate(
            model.decoder,
            prompts[i : i + batch],
            new_tokens,
            eos=None,
            speculative=speculative,
            draft_fn=draft_fn,
            min_tokens_per_forward=min_tokens_per_forward,
        )
        tokens += g.tokens
        seconds += g.stats.seconds
        stats.append(g.stats)
    new = sum(s.new_tokens for s in stats)
    row_forwards = sum(s.row_forwards for s in stats)
    proposed = [sum(s.proposed[j] for s in stats) for j in range(len(stats[0].proposed))]
    accepted = [sum(s.accepted[j] for s in stats) for j in range(len(stats[0].accepted))]
    acceptance = [a / p if p else 0.0 for a, p in zip(accepted, proposed, strict=True)]
    return (
        tokens,
        seconds,
        {"new_tokens": new, "tokens_per_forward": new / row_forwards, "acceptance": acceptance},
    )


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads) if args.threads else None
    model = load_model(args.model)
    datasets, _, field = run_validation_data(model)
    batches = read_batches(model, datasets, -(-args.prompts // 8), 8, field)
    prompts = [r for b in batches for r in b[:, : args.prompt_tokens].tolist()][: args.prompts]
    new_tokens = min(args.new_tokens, model.decoder.cfg.context - args.prompt_tokens)
    rows = []
    measured: dict = {}
    for batch in args.batch_sizes:
        best = {"greedy": float("inf"), "heads": float("inf"), "auto": float("inf"), "perfect": float("inf")}
        # the reference (and a warm-up)
        greedy_tokens, _, _ = _decode(model, prompts, batch, new_tokens, False)
        for _ in range(args.repeats):  # alternate, so machine noise hits all alike
            for mode in best:
                ref = greedy_tokens if mode == "perfect" else None
                min_tpf = MIN_TOKENS_PER_FORWARD if mode == "auto" else 0.0
                tokens, seconds, stats = _decode(
                    model, prompts, batch, new_tokens, mode != "greedy", ref, min_tpf
                )
                best[mode] = min(best[mode], seconds)
                assert tokens == greedy_tokens or mode == "heads", f"{mode} drafts changed the tokens"
                if mode != "greedy":
                    measured[mode] = (tokens, stats)
        new = sum(len(t) for t in greedy_tokens)
        (spec_tokens, spec_stats), (_, perfect_stats) = measured["heads"], measured["perfect"]
        rows.append(
            {
                "batch": batch,
                "greedy_tok_s": new / best["greedy"],
                "speculative_tok_s": new / best["heads"],
                "speedup": best["greedy"] / best["heads"],
                "tokens_per_forward": spec_stats["tokens_per_forward"],
                "acceptance": spec_stats["acceptance"],
                "identical": spec_tokens == greedy_tokens,
                "auto_speedup": best["greedy"] / best["auto"],
                "perfect_drafts_speedup": best["greedy"] / best["perfect"],
                "perfect_tokens_per_forward": perfect_stats["tokens_per_forward"],
            }
        )
    return {
        "model": str(model.source),
        "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": new_tokens,
        "heads": model.decoder.cfg.mtp_heads,
        "rows": rows,
    }


def print_table(result: dict) -> None:
    print(
        f"model {result['model']}: n={result['heads']}, {result['prompts']} held-out prompts of "
        f"{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens each"
    )
    print(
        "batch  greedy tok/s  speculative tok/s  speedup  tokens/forward  acceptance (head 2..n)  identical"
        f"  | default (stops drafting if < {MIN_TOKENS_PER_FORWARD} tok/fwd)"
        "  | perfect drafts: speedup  tokens/forward"
    )
    for r in result["rows"]:
        acc = " ".join(f"{a:.2f}" for a in r["acceptance"])
        print(
            f"{r['batch']:>5}  {r['greedy_tok_s']:>12.1f}  {r['speculative_tok_s']:>17.1f}"
            f"  {r['speedup']:>6.2f}x"
            f"  {r['tokens_per_forward']:>14.2f}  {acc:>22}  {str(r['identical']):>9}"
            f"  | {r['auto_speedup']:>40.2f}x  | {r['perfect_drafts_speedup']:>22.2f}x"
            f"  {r['perfect_tokens_per_forward']:>14.2f}"
        )
    print(
        "perfect drafts = the greedy continuation itself as drafts: the ceiling on this machine with heads "
        "that are always right"
    )


def main(argv: list[str] | None = None) -> dict:
    p = bench_parser(__doc__)
    p.add_argument(
        "--model", default="outputs/tiny-n4", help="run dir, checkpoint or export (default: the main job's)"
    )
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if not Path(args.model).exists():
        p.error(f"{args.model} does not exist: run the main job first (make train) or pass --model")
    return report(run(args), print_table, args.json)


if __name__ == "__main__":
    main()
