"""Where a run's data come from: its tokenizer, training mix and validation set, and how validation reads.

Either pre-built shards (``data.datasets`` + ``data.val_urls`` + ``data.tokenizer``, checked against the
tokenizer they were made with) or the corpus built once from ``data.source`` into ``data.cache_dir``.
Training and ``mtp-eval`` both find a run's validation set here, so they evaluate the same documents.
Both check the data before they start (:func:`preflight`): a missing or unreadable shard, training or
validation, is found before the first step, not at the first validation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mtp_pretrain import parallel
from mtp_pretrain.config import DataConfig
from mtp_pretrain.data.corpus import Corpus, prepare_corpus
from mtp_pretrain.data.datasets import Dataset
from mtp_pretrain.data.shard_reader import ShardReadError, probe_shard
from mtp_pretrain.data.shards import check_shard_tokenizer
from mtp_pretrain.data.stream import SKIP_HINT, PackedBatchStream
from mtp_pretrain.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class DataSources:
    """A run's tokenizer, training mix and validation set (empty when the run has none)."""

    tokenizer_path: Path
    train: list[Dataset]
    val: list[Dataset]


def build_data_sources(d: DataConfig) -> DataSources:
    """The data ``d`` names: pre-built shards (refused when pre-tokenized with another tokenizer than
    ``data.tokenizer``), or the corpus built from ``data.source``.

    A collective when torch.distributed is up: call it on every rank (rank 0 builds the corpus cache, the
    others wait and then only read it).
    """
    if d.datasets:
        train = [Dataset.of(x.urls, x.weight, x.name) for x in d.datasets]
        val = _prebuilt_val(d)
        preflight(train + val, d.on_error)
        for ds in train + val:
            check_shard_tokenizer(ds.urls, d.tokenizer)  # type: ignore[arg-type]
        return DataSources(Path(d.tokenizer), train, val)  # type: ignore[arg-type]
    corpus = _shared_corpus(d)
    sources = DataSources(
        corpus.tokenizer_path,
        [Dataset.of(corpus.train_urls, name="train")],
        [Dataset.of(corpus.val_urls, name="val")],
    )
    preflight(sources.train + sources.val, d.on_error)
    return sources


def preflight(datasets: Sequence[Dataset], on_error: str) -> int:
    """Check before the first step what can be checked cheaply: every local shard of ``datasets`` exists and
    is a tar whose first member can be read (:func:`~mtp_pretrain.data.shard_reader.probe_shard`: one open
    and a header read per shard, so thousands of shards take seconds). ``pipe:`` and remote URLs are not
    checked (reading them is not cheap); their damage shows when they are read.

    A bad shard follows ``on_error``: ``"raise"`` raises :class:`ShardReadError` naming it; ``"skip"`` logs a
    warning and leaves it in the dataset (the readers skip and count it when they reach it, so every rank
    keeps the same shard lists), but a dataset none of whose shards is readable is a :class:`DataError`
    either way. Returns the number of bad shards found.
    """
    bad_total = 0
    for ds in datasets:
        bad: list[str] = []
        for url in ds.urls:
            try:
                probe_shard(url)
            except ShardReadError as e:
                if on_error == "raise":
                    raise type(e)(f"dataset {ds.name!r}: {e}{SKIP_HINT}") from None
                bad.append(str(e))
                if len(bad) <= _WARN_AT_MOST:
                    log.warning("data: dataset %r: %s (data.on_error=skip: it will be skipped)", ds.name, e)
        if len(bad) == len(ds.urls):
            raise DataError(
                f"dataset {ds.name!r}: none of its {len(bad)} shard(s) is readable, e.g. {bad[0]}"
            )
        if len(bad) > _WARN_AT_MOST:
            log.warning(
                "data: dataset %r: %d of %d shards are unreadable and will be skipped",
                ds.name,
                len(bad),
                len(ds.urls),
            )
        bad_total += len(bad)
    return bad_total


_WARN_AT_MOST = 10  # bad shards warned about one by one per dataset; the rest are counted in one line


def validation_sets(d: DataConfig) -> list[Dataset]:
    """Only the validation set of the data ``d`` names (what ``mtp-eval`` reads: the training shards need
    not be there), pre-flight checked; the built corpus is built or found as :func:`build_data_sources`
    does."""
    if not d.datasets:
        return build_data_sources(d).val
    val = _prebuilt_val(d)
    preflight(val, d.on_error)
    return val


def _prebuilt_val(d: DataConfig) -> list[Dataset]:
    return [Dataset.of(d.val_urls, name="val")] if d.val_urls else []


def _shared_corpus(d: DataConfig) -> Corpus:
    def build() -> Corpus:
        return prepare_corpus(d.source, d.cache_dir, d.vocab_size, d.val_shards, d.docs_per_shard)

    # rank 0 builds the cache once; the others then only read it (concurrent builders would each train a
    # tokenizer and race to rename their build into place)
    if parallel.rank() == 0:
        corpus = build()
    parallel.barrier()
    if parallel.rank() != 0:
        corpus = build()
    return corpus


def validation_batches(
    val: Sequence[Dataset],
    tokenizer_path: str | Path,
    micro_batch: int,
    sample_len: int,
    *,
    reader: int = 0,
    num_readers: int = 1,
    on_error: str = "skip",
    text_field: str = "text",
) -> PackedBatchStream:
    """Reader ``reader``'s packed ``[micro_batch, sample_len]`` batches of the validation set: one epoch
    from the start, shards unshuffled, the last batch PAD-filled; every call reads the same batches, so
    validations at different steps (and ``mtp-eval``) compare like with like."""
    return PackedBatchStream(
        val,
        tokenizer_path,
        micro_batch,
        sample_len,
        seed=0,
        reader=reader,
        num_readers=num_readers,
        shuffle_shards=False,
        loop=False,
        on_error=on_error,
        text_field=text_field,
    )
