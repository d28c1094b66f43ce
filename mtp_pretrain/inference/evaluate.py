"""`mtp-eval`: per-head held-out loss, perplexity and top-1 accuracy, and self-speculative acceptance.

The held-out data are the run's validation shards (read as the trainer's validation does: from the start,
unshuffled, the same packing and target masks), or any shards given. Head i's loss at position t is the
cross-entropy of token t+i, averaged over valid targets, exactly the training loss's definition
(tests/unit/inference/test_evaluate.py checks it against the trainer's own validation numbers).
"""

from __future__ import annotations

import itertools
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mtp_pretrain.checkpoint import Checkpointer
from mtp_pretrain.config import from_yaml
from mtp_pretrain.data.datasets import Dataset
from mtp_pretrain.data.shards import check_shard_tokenizer
from mtp_pretrain.data.sources import validation_batches, validation_sets
from mtp_pretrain.data.tokenizer import pad_id
from mtp_pretrain.inference.generate import generate
from mtp_pretrain.inference.weights import LoadedModel
from mtp_pretrain.targets import HeadStats, HeadTargets, joint_hits, target_mask


def run_validation_data(model: LoadedModel) -> tuple[list[Dataset], bool, str]:
    """(validation datasets, mask_doc_boundaries, text_field) recorded in a training checkpoint's config."""
    if not (model.source / "mtp_checkpoint.json").is_file():
        raise ValueError(f"{model.source} is an export: name the held-out shards with --data")
    d = from_yaml(Checkpointer.read_common(model.source)["config"]).data
    val = validation_sets(d)  # found as the trainer found it (pre-tokenized shards: checked by read_batches)
    if not val:
        raise ValueError("the run had no data.val_urls: name the held-out shards with --data")
    return val, d.mask_doc_boundaries, d.text_field


def read_batches(
    model: LoadedModel, datasets: Sequence[Dataset], batches: int, batch_size: int, text_field: str = "text"
) -> list[torch.Tensor]:
    """Up to ``batches`` packed [batch_size, context + n] batches of the data, read from the start in order
    (as the trainer's validation reads them); pre-tokenized shards must be of the model's tokenizer."""
    n, seq = model.decoder.cfg.mtp_heads, model.decoder.cfg.context
    with tempfile.TemporaryDirectory() as tmp:  # the streams read the tokenizer from a file
        tok_path = Path(tmp) / "tokenizer.json"
        tok_path.write_text(model.tokenizer.to_str())
        for ds in datasets:
            check_shard_tokenizer(ds.urls, str(tok_path))
        stream = validation_batches(datasets, tok_path, batch_size, seq + n, text_field=text_field)
        return list(itertools.islice(stream, batches))


@torch.no_grad()
def heldout_metrics(
    model: LoadedModel, batches: Sequence[torch.Tensor], mask_doc_boundaries: bool = False
) -> dict[str, float]:
    """{loss,ppl,acc,tokens}/head<i> over packed batches [B, context + n] (see read_batches), and the
    validation's teacher-forced draft acceptance ``accept_k`` and ``tokens_per_forward`` (HeadStats.acceptance)."""
    dec = model.decoder
    n, seq = dec.cfg.mtp_heads, dec.cfg.context
    pad = pad_id(model.tokenizer)
    # summed in fp64 over every batch: the mean is taken once, over all valid targets (as validation does)
    stats = HeadStats.unpacked(torch.zeros(n, 4, dtype=torch.float64))
    for tokens in batches:
        valid, segments = target_mask(tokens, model.eos, pad, mask_doc_boundaries)
        targets = HeadTargets(tokens, valid, segments)
        # sequential heads read the tokens after the inputs too, as the training batch gives them
        device = dec.embed.device
        logits = dec(tokens[:, :seq].to(device), lookahead=tokens[:, seq:].to(device))  # [n, B, T, V]
        hits = []
        for i in range(n):
            tgt, ok = targets.of_head(i, seq)  # [T, B]
            lg = logits[i].transpose(0, 1).float().cpu()  # [T, B, V]
            ce = F.cross_entropy(lg.flatten(0, 1), tgt.flatten(), reduction="none").view_as(tgt)
            stats.loss_sum[i] += (ce * ok).sum().double()
            hits.append((lg.argmax(-1) == tgt) & ok)
            stats.correct[i] += hits[-1].sum()
            stats.count[i] += ok.sum()
        stats.joint += torch.stack([j.sum() for j in joint_hits(torch.stack(hits))])
    head = stats.metrics()
    out: dict[str, float] = {}
    for k in range(1, n + 1):
        loss = head[f"loss/head{k}"]
        out |= {f"loss/head{k}": loss, f"ppl/head{k}": math.exp(loss), f"acc/head{k}": head[f"acc/head{k}"]}
        out[f"tokens/head{k}"] = float(stats.count[k - 1])
    return out | stats.acceptance()


def acceptance(
    model: LoadedModel, batches: Sequence[torch.Tensor], prompts: int, prompt_len: int, new_tokens: int
) -> dict:
    """Self-speculative statistics on ``prompts`` held-out prompts (the first ``prompt_len`` tokens of the
    batches' rows, which start anywhere in a document as training rows do), decoded as one batch, and
    whether the tokens equal plain greedy decoding's."""
    rows = [r for b in batches for r in b[:, :prompt_len].tolist()][:prompts]
    if not rows:
        return {}
    spec = generate(
        model.decoder, rows, new_tokens, eos=model.eos, speculative=True, min_tokens_per_forward=0
    )
    plain = generate(model.decoder, rows, new_tokens, eos=model.eos, speculative=False)
    out = spec.stats.as_dict()
    out["identical_to_greedy"] = spec.tokens == plain.tokens
    out["greedy_tokens_per_second"] = plain.stats.tokens_per_second
    return out


def table(metrics: dict[str, float], n: int) -> str:
    lines = ["head  loss    ppl       acc", "----  ------  --------  -----"]
    for i in range(1, n + 1):
        lines.append(
            f"{i:>4}  {metrics[f'loss/head{i}']:.4f}  {metrics[f'ppl/head{i}']:8.2f}  {metrics[f'acc/head{i}']:.3f}"
        )
    return "\n".join(lines)
