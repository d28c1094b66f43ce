"""Generation with a KV cache: greedy, sampling, and self-speculative decoding with the MTP heads.

Self-speculative (blockwise parallel) decoding, Stern et al. 2018 / Gloeckle et al. 2024 §3.2: after a
forward pass the next-token head gives token x, and heads 2..n at the same position give drafts d1..d(n-1)
of the tokens after it. The next forward runs the block [x, d1, ..., d(n-1)] through the trunk and every
head at once. Head 1's argmax g0..g(n-1) over the block is what greedy decoding would produce at each of
those positions *if* the inputs before it are right: d1 is right iff d1 == g0, d2 iff also d2 == g1, ...
So the longest matching prefix (a drafts) is accepted, g_a is head 1's own next token (always right), and
a + 1 tokens come out of one forward. Rejected positions are rolled back by moving each row's cache length
back; heads 2..n at the last accepted position supply the next drafts (``MTPDecoder.draft_logits``: from
the same forward, except sequential heads, which read the tokens they draft and run after it). The output
equals greedy decoding token for token (tests/unit/inference/test_generate.py, test_head_types.py); only
the number of forward passes changes.

A forward over every head costs more than one over head 1 alone (measured ~1.4x on CPU at batch 1 for the
demo model, whose 4 heads are 2/3 of its blocks), so drafts that are rarely accepted make decoding slower.
After ``PROBE_FORWARDS`` drafting forwards, a call whose drafts gained fewer than ``min_tokens_per_forward``
tokens per forward stops drafting and decodes plainly (same tokens; ``DecodeStats.drafting_stopped_at``).

Sampling (temperature > 0) runs the plain path: speculation as implemented here is exact for greedy only.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtp_pretrain import compat
from mtp_pretrain.inference.model import MTPDecoder
from mtp_pretrain.inference.weights import LoadedModel

PROBE_FORWARDS = 8  # drafting forwards before deciding whether drafting pays (see the module docstring)
MIN_TOKENS_PER_FORWARD = 1.5  # below this gain drafting stops: a forward over all heads costs ~1.4x here
# called with (row, its new tokens) as soon as they are decided: streaming output
TokenCallback = Callable[[int, list[int]], None]
# (tokens generated so far per row, the heads' drafts [B, n-1]) -> the drafts to verify: tests and external drafters
DraftFn = Callable[[list[list[int]], Tensor], Tensor]


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class DecodeStats:
    """What one generate() call did. ``accepted[j]/proposed[j]``: how often draft j+1 (from head j+2) was
    accepted when it was looked at (every draft before it accepted)."""

    rows: int = 0
    new_tokens: int = 0
    forwards: int = 0  # forward passes, the prompt's included
    row_forwards: int = 0  # forward passes summed over the rows still generating in each
    seconds: float = 0.0
    speculative: bool = False
    drafting_stopped_at: int | None = None  # the forward after which drafting did not pay and stopped
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens a row gains per forward pass (1.0 for plain decoding)."""
        return self.new_tokens / self.row_forwards if self.row_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed, strict=True)]

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "new_tokens": self.new_tokens,
            "forwards": self.forwards,
            "seconds": self.seconds,
            "speculative": self.speculative,
            "drafting_stopped_at": self.drafting_stopped_at,
            "tokens_per_forward": self.tokens_per_forward,
            "tokens_per_second": self.tokens_per_second,
            "acceptance_per_head": {f"head{j + 2}": r for j, r in enumerate(self.acceptance)},
        }


def choose(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> Tensor:
    """Next token ids [B] from logits [B, V]: argmax, or a sample (temperature, top-k, top-p)."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row, without the prompt and without the final EOS
    stats: DecodeStats


def check_prompts(prompts: Sequence[Sequence[int]], context: int) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token of text")
        if len(p) > context:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, longer than the model's context of {context}: shorten it"
            )


@torch.no_grad()
@compat.cuda_shims_paused()
def generate(
    model: MTPDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos: int | None = None,
    sampling: Sampling | None = None,
    speculative: bool = True,
    on_tokens: TokenCallback | None = None,
    draft_fn: DraftFn | None = None,
    min_tokens_per_forward: float = MIN_TOKENS_PER_FORWARD,
) -> Generation:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens, stopping a row at ``eos``.

    ``speculative`` drafts with the extra heads when the model has them and decoding is greedy; the
    tokens are the same either way. Drafting stops for the rest of the call when, over its first
    ``PROBE_FORWARDS`` forwards, it gained fewer than ``min_tokens_per_forward`` tokens per forward (0: never
    stop). A row also stops at the model's context length.
    """
    cfg = model.cfg
    sampling = sampling or Sampling()
    check_prompts(prompts, cfg.context)
    speculative = speculative and sampling.greedy and cfg.mtp_heads > 1
    heads = cfg.mtp_heads if speculative else 1
    device = model.embed.device
    B = len(prompts)  # noqa: N806
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    limits = [min(max_new_tokens, cfg.context - len(p)) for p in prompts]
    if min(limits) < max_new_tokens:
        warnings.warn(f"generation stops at the model's context of {cfg.context} tokens", stacklevel=2)
    generator = None if sampling.greedy else torch.Generator(device=device).manual_seed(sampling.seed)
    stats = DecodeStats(
        rows=B, speculative=speculative, proposed=[0] * (heads - 1), accepted=[0] * (heads - 1)
    )
    out: list[list[int]] = [[] for _ in range(B)]
    done = [limit <= 0 for limit in limits]
    rows = torch.arange(B, device=device)
    start = time.perf_counter()

    def emit(b: int, tokens: list[int]) -> None:
        """Append row b's new tokens up to its limit and first EOS; mark it done there."""
        take = tokens[: limits[b] - len(out[b])]
        if eos is not None and eos in take:
            take, done[b] = take[: take.index(eos)], True
        out[b] += take
        done[b] = done[b] or len(out[b]) >= limits[b]
        if take and on_tokens is not None:
            on_tokens(b, take)

    # the prompts, right-padded (padding positions are stale cache entries, overwritten before being read)
    padded = torch.full(
        (B, int(lengths.max())), eos if eos is not None else 0, dtype=torch.long, device=device
    )
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = torch.as_tensor(list(p), device=device)
    # a row that finishes inside a block has advanced up to `heads` past its last token, and a finished
    # row's block still writes `heads` positions from there (its results are dropped)
    cache = model.new_cache(B, int(lengths.max()) + max_new_tokens + 2 * heads)
    hidden = model.hidden(padded, cache, model.step_heads(speculative))  # [heads or 1, B, S, d]
    cache.lengths.copy_(lengths)
    # decided, not yet run through the model
    pending = choose(model.logits(hidden[0, rows, lengths - 1]), sampling, generator)
    drafts = torch.zeros(B, 0, dtype=torch.long, device=device)  # [B, heads-1]
    if speculative:
        drafts = model.draft_logits(hidden, lengths - 1, pending, cache).argmax(-1).t()
    stats.forwards, stats.row_forwards = 1, B - sum(done)
    for b in range(B):
        if not done[b]:
            emit(b, [int(pending[b])])

    probe_tokens, probe_rows = 0, 0  # tokens gained / row-forwards while drafting, for the pays-off check
    while not all(done):
        if (
            speculative
            and stats.forwards - 1 == PROBE_FORWARDS
            and probe_tokens < min_tokens_per_forward * probe_rows
        ):
            speculative, stats.drafting_stopped_at = (
                False,
                stats.forwards,
            )  # the head stack costs more than it gains
            drafts = drafts[:, :0]
        if draft_fn is not None and speculative:
            drafts = draft_fn([list(o) for o in out], drafts)
        block = torch.cat([pending[:, None], drafts], dim=1)  # [B, heads]
        hidden = model.hidden(block, cache, model.step_heads(speculative))  # [heads or 1, B, block, d]
        stats.forwards += 1
        stats.row_forwards += B - sum(done)
        active = torch.tensor([not d for d in done], device=device)
        if not speculative:
            pending = choose(model.logits(hidden[0, :, -1]), sampling, generator)
            accepted = torch.zeros(B, dtype=torch.long, device=device)
            new = pending[:, None]
            cache.lengths += active.long()  # finished rows stay put
        else:
            greedy = model.logits(hidden[0]).argmax(-1)  # [B, heads]: head 1 at every block position
            accepted = (drafts == greedy[:, :-1]).long().cumprod(1).sum(1)  # longest matching prefix
            pending = greedy[rows, accepted]
            new = greedy
            cache.lengths += torch.where(active, accepted + 1, 0)  # finished rows stay put
            # heads 2..n where we stand (the drafting needs the lengths there: sequential heads)
            drafts = model.draft_logits(hidden, accepted, pending, cache).argmax(-1).t()
        new_list, accepted_list = new.tolist(), accepted.tolist()
        for b in range(B):
            if done[b]:
                continue
            a = accepted_list[b]
            if speculative:
                probe_tokens, probe_rows = probe_tokens + a + 1, probe_rows + 1
            for j in range(
                heads - 1 if speculative else 0
            ):  # draft j was looked at iff drafts 0..j-1 were accepted
                stats.proposed[j] += a >= j
                stats.accepted[j] += a > j
            emit(b, new_list[b][: a + 1])
    stats.new_tokens = sum(len(o) for o in out)
    stats.seconds = time.perf_counter() - start
    return Generation(out, stats)


def generate_text(
    model: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    speculative: bool = True,
    on_text: Callable[[int, str], None] | None = None,
    min_tokens_per_forward: float = MIN_TOKENS_PER_FORWARD,
) -> tuple[list[str], DecodeStats]:
    """Continue text prompts; ``on_text(row, piece)`` streams each row's text as it is decided.

    A prompt is read as the start of a document (EOS before it, as documents are packed in training).
    """
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: give some text to continue")
    ids = [[model.eos, *model.tokenizer.encode(p).ids] for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    shown = [""] * len(prompts)

    def stream(row: int, tokens: list[int]) -> None:
        new[row] += tokens
        text = model.tokenizer.decode(new[row])
        if not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
            on_text(row, text[len(shown[row]) :])
            shown[row] = text

    result = generate(
        model.decoder,
        ids,
        max_new_tokens,
        eos=model.eos,
        sampling=sampling,
        speculative=speculative,
        on_tokens=stream if on_text is not None else None,
        min_tokens_per_forward=min_tokens_per_forward,
    )
    return [model.tokenizer.decode(t) for t in result.tokens], result.stats
