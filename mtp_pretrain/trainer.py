"""The training loop. Short on purpose: it composes data, model, engine, checkpoint and metrics components.

Stateful components expose state_dict()/load_state_dict(); the checkpoint module stores them by name.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from megatron.core import parallel_state
from omegaconf import OmegaConf

from mtp_pretrain import parallel
from mtp_pretrain.checkpoint import Checkpointer, CheckpointError
from mtp_pretrain.config import Config, finetune_mismatches, from_yaml, shape_mismatches
from mtp_pretrain.data.corpus import prepare_corpus
from mtp_pretrain.data.loader import BatchLoader
from mtp_pretrain.data.shards import check_shard_tokenizer
from mtp_pretrain.data.stream import ERROR_KINDS, Dataset, PackedBatchStream
from mtp_pretrain.data.tokenizer import eos_id, load_tokenizer, pad_id, tokenizer_hash
from mtp_pretrain.engine.base import Batch, Engine, NonFiniteLossError
from mtp_pretrain.engine.megatron import MegatronEngine
from mtp_pretrain.faults import crash_point
from mtp_pretrain.flops import peak_flops, train_flops_per_token
from mtp_pretrain.loss import STAT_CORRECT, STAT_COUNT, STAT_LOSS_SUM
from mtp_pretrain.metrics import MetricsLogger
from mtp_pretrain.model.mtp_model import build_pipeline_chunks, transformer_config
from mtp_pretrain.preemption import StopRequest
from mtp_pretrain.rng import get_rng_state, set_rng_state
from mtp_pretrain.targets import target_mask


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # total training loss of every step run in this call
    head_losses: list[list[float]]  # per-head mean loss of every step run in this call
    val: dict[str, float]  # the last validation metrics
    run_dir: Path
    checkpoint: Path | None
    paths: dict[str, str]
    stopped: str | None = None  # why the run stopped early (signal / stop file), after saving; None = done
    nonfinite_steps: int = 0  # steps whose update was dropped because some loss was NaN/inf




def head_metrics(stats: torch.Tensor, loss: float) -> dict[str, float]:
    """Per-head mean loss and top-1 accuracy from summed [n, 3] stats."""
    count = stats[:, STAT_COUNT].clamp(min=1)
    out = {"loss": loss}
    for i, (lsum, correct, c) in enumerate(
        zip(stats[:, STAT_LOSS_SUM], stats[:, STAT_CORRECT], count, strict=True), start=1
    ):
        out[f"loss/head{i}"] = float(lsum / c)
        out[f"acc/head{i}"] = float(correct / c)
    return out


def _is_head_beyond(key: str, n: int) -> bool:
    """Whether a model state key belongs to head number >= n (0-based): absent from an n-head checkpoint."""
    match = re.match(r"(?:.*\.)?heads\.layers\.(\d+)\.", key)
    return match is not None and int(match[1]) >= n


def _versions() -> dict[str, str]:
    names = ["torch", "megatron-core", "mtp-pretrain"]
    return {n: importlib.metadata.version(n) for n in names}


class Trainer:
    """Builds every component from the config (fails early on bad input), then `fit()` trains."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t = cfg.trainer
        self.layout = parallel.init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=t.seed, vpp=cfg.parallel.vpp)
        self.run_dir = Path(t.run_dir)
        self.tokenizer_path, self.train_sets, self.val_sets = self._datasets()
        tok = load_tokenizer(self.tokenizer_path)
        self.vocab_size, self.eos, self.pad = tok.get_vocab_size(), eos_id(tok), pad_id(tok)
        torch.manual_seed(t.seed)  # torch's own streams (dropout); weights come from init_parameters(seed)
        self.tconfig = transformer_config(
            cfg.model, cfg.mtp, cfg.parallel.tp, cfg.parallel.pp, bf16=t.bf16, recompute=t.recompute,
            stage_layers=(cfg.parallel.first_stage_layers, cfg.parallel.last_stage_layers), vpp=cfg.parallel.vpp,
        )  # fmt: skip
        chunks = build_pipeline_chunks(
            cfg.model, cfg.mtp, self.vocab_size, self.tconfig, seed=t.seed
        )
        self.engine = self._build_engine(chunks)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.sample_len = cfg.model.seq_len + cfg.mtp.n
        d = cfg.data
        self.train_data = BatchLoader(
            self.train_sets, self.tokenizer_path, t.micro_batch_size, self.sample_len, seed=t.seed,
            dp_rank=self.dp_rank, dp_size=self.layout.dp, num_workers=d.num_workers, on_error=d.on_error,
            text_field=d.text_field,
        )  # fmt: skip
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep_last=t.keep_last)
        self.step = 0
        self.consumed_tokens = 0
        self._resume()
        self.metrics = MetricsLogger(
            cfg.logging,
            self.run_dir,
            total_steps=t.steps,
            start_step=self.step,
            enabled=parallel.is_logging_rank(),
            config_dict=dataclasses.asdict(cfg),
            n_heads=cfg.mtp.n,
        )

    # -- set-up ---------------------------------------------------------------------------------------
    def _build_engine(self, chunks: list[torch.nn.Module]) -> Engine:
        cfg, t = self.cfg, self.cfg.trainer
        if cfg.parallel.engine == "deepspeed":
            from mtp_pretrain.engine.deepspeed import DeepSpeedEngine  # imports deepspeed only when asked

            return DeepSpeedEngine(chunks[0], cfg.optim, t.steps, cfg.parallel, t.micro_batch_size, t.grad_accum, t.bf16)
        return MegatronEngine(
            chunks, self.tconfig, cfg.optim, t.steps, bf16=t.bf16, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce
        )

    def _datasets(self) -> tuple[Path, list[Dataset], list[Dataset]]:
        """(tokenizer, training mix, validation set): pre-built shards, or the corpus built from sources."""
        d = self.cfg.data
        if d.datasets:
            train = [Dataset.of(x.urls, x.weight, x.name) for x in d.datasets]
            val = [Dataset.of(d.val_urls, name="val")] if d.val_urls else []
            for ds in train + val:
                check_shard_tokenizer(ds.urls, d.tokenizer)  # type: ignore[arg-type]
            return Path(d.tokenizer), train, val  # type: ignore[arg-type]

        def build():  # noqa: ANN202
            return prepare_corpus(d.source, d.cache_dir, d.vocab_size, d.val_shards, d.docs_per_shard)

        # rank 0 builds the cache once; the others then only read it
        if parallel.rank() == 0:
            corpus = build()
        torch.distributed.barrier()
        if parallel.rank() != 0:
            corpus = build()
        return corpus.tokenizer_path, [Dataset.of(corpus.train_urls, name="train")], [Dataset.of(corpus.val_urls, name="val")]

    def _common_state(self) -> dict:
        return {
            "trainer": {"step": self.step, "consumed_tokens": self.consumed_tokens},
            "engine": self.engine.state_dict(),
            "config": OmegaConf.to_yaml(OmegaConf.structured(self.cfg)),
            "tokenizer_hash": tokenizer_hash(self.tokenizer_path),
            "tokenizer_json": Path(self.tokenizer_path).read_text(),  # self-contained for export / generation
            "versions": _versions(),
        }

    def _resume(self) -> None:
        """Continue this run from its newest valid checkpoint (or ``trainer.resume=PATH``); else, with
        ``trainer.init_from``, start from another run's weights."""
        t = self.cfg.trainer
        ckpt = None
        if t.resume == "auto":
            ckpt = self.checkpointer.latest()
        elif t.resume != "none":
            ckpt = Path(t.resume)
        if ckpt is not None:
            self._load(ckpt)
        elif t.init_from:
            self._init_from(Path(t.init_from))

    def _read_compatible(self, ckpt: Path, finetune: bool) -> dict:
        common = self.checkpointer.read_common(ckpt)
        if common["tokenizer_hash"] != tokenizer_hash(self.tokenizer_path):
            raise CheckpointError(f"{ckpt} was trained with another tokenizer; point data.* at the same corpus")
        saved = from_yaml(common["config"])
        bad = finetune_mismatches(saved, self.cfg) if finetune else shape_mismatches(saved, self.cfg)
        if bad:
            hint = ""
            if not finetune and saved.mtp.n != self.cfg.mtp.n:
                hint = "; to start a run with another mtp.n from these weights use trainer.init_from=<checkpoint> in a new run_dir"
            raise CheckpointError(f"{ckpt} does not fit this model: {'; '.join(bad)}{hint}")
        return common

    def _load(self, ckpt: Path) -> None:
        common = self._read_compatible(ckpt, finetune=False)
        _, per_rank = self.checkpointer.load(ckpt)
        self.engine.load(ckpt)
        self.engine.load_state_dict(common["engine"])
        self.step = common["trainer"]["step"]
        self.consumed_tokens = common["trainer"]["consumed_tokens"]
        data = common["data"]
        same_readers = data["dp_size"] == self.layout.dp and max(data["num_workers"], 1) == self.train_data.readers_per_rank
        if same_readers:
            self.train_data.load_state_dict(data["loaders"][self.dp_rank])
        else:
            self.train_data.load_resharded(data["loaders"])
        if per_rank is not None:
            set_rng_state(per_rank["rng"])
        if parallel.rank() == 0:
            print(f"resumed from {ckpt} at step {self.step}")
            if per_rank is None:
                print("  world size changed: RNG streams restart from the seed (they only drive dropout)")
            if not same_readers:
                print(
                    f"  data readers changed (DP {data['dp_size']} x workers {data['num_workers']} -> DP "
                    f"{self.layout.dp} x workers {self.cfg.data.num_workers}): the unread rest of the current "
                    f"epoch is dealt out to the new readers; no document repeated or skipped, order changes"
                )

    def _init_from(self, ckpt: Path) -> None:
        """Model weights only (trunk + the first min(n, n_ckpt) heads); step 0, fresh optimizer and data."""
        common = self._read_compatible(ckpt, finetune=True)
        n_old = from_yaml(common["config"]).mtp.n
        self.engine.load_model_weights(ckpt, keep=lambda key: not _is_head_beyond(key, n_old))
        if parallel.rank() == 0:
            print(f"initialised from {ckpt}: trunk + heads 1..{min(n_old, self.cfg.mtp.n)} of its {n_old}")

    def save(self) -> Path:
        # every DP rank's loader position, on every rank: a run with another DP size can re-deal them
        mine = (self.dp_rank, self.train_data.state_dict())
        every: list = [None] * parallel.world_size()
        torch.distributed.all_gather_object(every, mine)
        data = {
            "dp_size": self.layout.dp,
            "num_workers": self.cfg.data.num_workers,
            "loaders": dict(every),
        }
        ckpt = self.checkpointer.save(
            self.step,
            self.engine.save,
            common={**self._common_state(), "data": data},
            per_rank={"rng": get_rng_state()},
        )
        return ckpt

    # -- the loop -------------------------------------------------------------------------------------
    def _micro_batches(self, stream: Iterator[torch.Tensor], count: int) -> Iterator[Batch]:
        for tokens in itertools.islice(stream, count):
            crash_point("micro_batch")
            yield (tokens, *target_mask(tokens, self.eos, self.pad, self.cfg.data.mask_doc_boundaries))

    def validate(self) -> dict[str, float]:
        """Per-head loss/accuracy over ``trainer.val_batches`` batches per DP rank of the validation shards.

        Read from the start each time, without shuffling; a rank whose share of the validation shards ends
        early runs fully padded batches (they count nothing), so every rank runs the same collectives.
        """
        t = self.cfg.trainer
        val = PackedBatchStream(
            self.val_sets, self.tokenizer_path, t.micro_batch_size, self.sample_len, seed=0,
            reader=self.dp_rank, num_readers=self.layout.dp, shuffle_shards=False, loop=False,
            on_error=self.cfg.data.on_error, text_field=self.cfg.data.text_field,
        )  # fmt: skip
        padding = itertools.repeat(torch.full((t.micro_batch_size, self.sample_len), self.pad, dtype=torch.long))
        _, stats = self.engine.eval_step(
            self._micro_batches(itertools.chain(val, padding), t.val_batches),
            t.val_batches, self.cfg.model.seq_len, t.micro_batch_size,
        )  # fmt: skip
        if stats is None:
            return {}
        m = head_metrics(stats, 0.0)
        weights = self.cfg.mtp.weights()
        m["loss"] = sum(w * m[f"loss/head{i}"] for i, w in enumerate(weights, start=1))
        return m

    def _data_errors(self) -> dict[str, float]:
        """Shards/samples skipped so far, summed over the data-parallel ranks (a collective: call on all)."""
        counts = torch.tensor([self.train_data.errors[k] for k in ERROR_KINDS], dtype=torch.float64)
        group = parallel_state.get_data_parallel_group()
        if torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(counts, group=group)
        return {f"data/{k}": float(v) for k, v in zip(ERROR_KINDS, counts.tolist(), strict=True)}

    def fit(self) -> TrainResult:
        """Train to trainer.steps (or until asked to stop), validating and saving on the way."""
        t = self.cfg.trainer
        stop = StopRequest(self.run_dir / t.stop_file if t.stop_file else None)
        try:
            return self._loop(stop)
        finally:
            stop.close()
            self.train_data.close()  # stop the reader workers; a later fit() restarts them where they were

    def _loop(self, stop: StopRequest) -> TrainResult:
        cfg, t = self.cfg, self.cfg.trainer
        tokens_per_step = t.micro_batch_size * cfg.model.seq_len * t.grad_accum * self.layout.dp
        flops_per_token = train_flops_per_token(cfg.model, cfg.mtp.n, self.vocab_size)
        peak = peak_flops(torch.bfloat16 if t.bf16 else torch.float32) * self.layout.world_size
        losses, head_losses, val, ckpt = [], [], {}, None
        nonfinite, in_a_row = 0, 0
        while self.step < t.steps:
            start = time.perf_counter()
            result = self.engine.train_step(
                self._micro_batches(self.train_data, t.grad_accum), t.grad_accum, cfg.model.seq_len, t.micro_batch_size
            )
            elapsed = time.perf_counter() - start
            self.step += 1
            self.consumed_tokens += tokens_per_step
            if result.nonfinite:
                nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
                self._on_nonfinite(result.loss, in_a_row)
            else:
                in_a_row = 0
            m: dict[str, float] = {"nonfinite_steps": nonfinite}
            if result.head_stats is not None:
                m.update(head_metrics(result.head_stats, result.loss))
                losses.append(result.loss)
                head_losses.append([m[f"loss/head{i + 1}"] for i in range(cfg.mtp.n)])
                tps = tokens_per_step / elapsed
                m.update(
                    lr=result.lr,
                    grad_norm=result.grad_norm,
                    tokens_per_s=tps,
                    mfu=tps * flops_per_token / peak,
                    mem_gb=_memory_gb(),
                )
            if self.metrics.emits(self.step):  # all ranks: the data error counts are all-reduced
                m.update(self._data_errors())
            if result.head_stats is not None:
                self.metrics.log_train(self.step, m)
            if t.val_every and (self.step % t.val_every == 0 or self.step == t.steps):
                val = self.validate()
                self.metrics.log_val(self.step, val)
            crash_point("step")
            if stop.should_stop():  # every rank, every step: one tiny all-reduce
                ckpt = self.save()
                stop.acknowledge()
                if parallel.rank() == 0:
                    print(f"stopping at step {self.step} ({stop.reason}): saved {ckpt}; resume continues from it")
                break
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps:
                ckpt = self.save()
        paths = self.metrics.finish()
        return TrainResult(
            self.step, losses, head_losses, val, self.run_dir, ckpt, paths, stop.reason, nonfinite_steps=nonfinite
        )

    def _on_nonfinite(self, loss: float, in_a_row: int) -> None:
        """The engine dropped this step's update; abort (nothing saved) if the policy or a streak says so."""
        policy = self.cfg.trainer.nonfinite
        if policy == "abort" or in_a_row >= MAX_NONFINITE_IN_A_ROW:
            why = "trainer.nonfinite=abort" if policy == "abort" else f"{in_a_row} steps in a row"
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) at step {self.step} ({why}); nothing was saved after it. Resume from "
                f"the last checkpoint with a lower optim.lr or more optim.warmup_steps"
            )
        if parallel.is_logging_rank():
            print(f"step {self.step}: non-finite loss ({loss}): update dropped (trainer.nonfinite=skip)")


MAX_NONFINITE_IN_A_ROW = 20  # under trainer.nonfinite=skip: more means the run diverged, not a bad batch


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30
