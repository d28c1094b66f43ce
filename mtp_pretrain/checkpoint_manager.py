"""What a checkpoint holds, from which parts, and when a run loads one (torchtitan's CheckpointManager).

The parts are stateful (``state_dict()`` / ``load_state_dict()``); the manager knows only that protocol:
    shared by all ranks (trainer.pt):  trainer counters, engine schedule, every DP rank's data position,
                                       + the run's config, tokenizer and library versions
    per rank (rank_NNNNN.pt):          RNG streams
    sharded (the engine's own files):  model + optimizer
Adding a stateful thing adds one entry to ``parts`` (or ``rank_parts``). The files themselves (atomic step
directories, verification, `latest`) are checkpoint.Checkpointer's job.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtp_pretrain import parallel
from mtp_pretrain.checkpoint import Checkpointer, CheckpointError, on_every_rank
from mtp_pretrain.config import Config, ffn_hidden_size, from_yaml
from mtp_pretrain.data.loader import BatchLoader
from mtp_pretrain.data.tokenizer import tokenizer_hash
from mtp_pretrain.engine.base import Engine
from mtp_pretrain.errors import MTPError


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """The trainer's counters."""

    step: int = 0
    consumed_tokens: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.consumed_tokens = int(state["step"]), int(state["consumed_tokens"])


class DataPosition:
    """Every DP rank's loader position, stored on every rank: a run with another DP size or worker count
    re-deals the unread rest of the epoch (no document repeated or skipped)."""

    def __init__(self, loader: BatchLoader, dp_rank: int, dp_size: int, num_workers: int) -> None:
        self.loader, self.dp_rank, self.dp_size, self.num_workers = loader, dp_rank, dp_size, num_workers

    def state_dict(self) -> dict[str, Any]:
        """A collective: gathers the positions of all ranks."""
        every: list = [None] * parallel.world_size()
        torch.distributed.all_gather_object(every, (self.dp_rank, self.loader.state_dict()))
        return {"dp_size": self.dp_size, "num_workers": self.num_workers, "loaders": dict(every)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        same = (
            state["dp_size"] == self.dp_size and max(state["num_workers"], 1) == self.loader.readers_per_rank
        )
        if same:
            self.loader.load_state_dict(state["loaders"][self.dp_rank])
            return
        self.loader.load_resharded(state["loaders"])
        if parallel.rank() == 0:
            print(
                f"  data readers changed (DP {state['dp_size']} x workers {state['num_workers']} -> DP "
                f"{self.dp_size} x workers {self.num_workers}): the unread rest of the current epoch is dealt "
                f"out to the new readers; no document repeated or skipped, order changes"
            )


def _versions() -> dict[str, str]:
    return {n: importlib.metadata.version(n) for n in ("torch", "megatron-core", "mtp-pretrain")}


def _is_head_beyond(key: str, n: int) -> bool:
    """Whether a model state key belongs to head number >= n (0-based): absent from an n-head checkpoint."""
    match = re.match(r"(?:.*\.)?heads\.layers\.(\d+)\.", key)
    return match is not None and int(match[1]) >= n


# What a checkpoint's tensors depend on: a run that differs in one of these cannot load its weights.
_SHAPE_KEYS = (
    "model.num_layers",
    "model.hidden_size",
    "model.num_attention_heads",
    "model.num_query_groups",
    "model.ffn_hidden_size",
    "model.tie_embeddings",
    "mtp.n",
)


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    if key == "model.ffn_hidden_size":
        return ffn_hidden_size(cfg.model)
    return getattr(getattr(cfg, section), name)


def shape_mismatches(saved: Config, cfg: Config, keys: tuple[str, ...] = _SHAPE_KEYS) -> list[str]:
    """``key: checkpoint X, this run Y`` for every weight-shape setting that differs."""
    return [
        f"{k}: checkpoint {_get(saved, k)}, this run {_get(cfg, k)}"
        for k in keys
        if _get(saved, k) != _get(cfg, k)
    ]


def finetune_mismatches(saved: Config, cfg: Config) -> list[str]:
    """As :func:`shape_mismatches` for starting a run from a checkpoint with another ``mtp.n``: the trunk
    (``model.num_layers - mtp.n`` blocks) and widths must match, the number of heads may differ."""
    keys = tuple(k for k in _SHAPE_KEYS if k not in ("model.num_layers", "mtp.n"))
    out = shape_mismatches(saved, cfg, keys)
    old, new = saved.model.num_layers - saved.mtp.n, cfg.model.num_layers - cfg.mtp.n
    if old != new:
        out.append(
            f"trunk blocks (model.num_layers - mtp.n): checkpoint {old}, this run {new}; "
            f"set model.num_layers={old + cfg.mtp.n}"
        )
    return out


# What trainer.pt holds besides the parts (CheckpointManager.save); a file without them is not ours
_COMMON_KEYS = ("config", "tokenizer_hash")
# What a part's load_state_dict raises on a state of the wrong shape (missing key, wrong type or value)
_BAD_STATE = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def _why(e: BaseException) -> str:
    """An exception as ``Type: first line of its message``."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _require(ckpt: Path, file: str, state: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"{ckpt}: {file} lacks {', '.join(map(repr, missing))} (written by another program or version); "
            "give a checkpoint of this mtp-pretrain"
        )


@contextmanager
def _loading(ckpt: Path, what: str) -> Iterator[None]:
    """A malformed state in a checkpoint that passed verification (another version's layout, a corruption
    a size-only check missed) as one CheckpointError line instead of a raw traceback."""
    try:
        yield
    except MTPError:
        raise  # already says what is wrong (a ConfigError is also a ValueError)
    except (*_BAD_STATE, OmegaConfBaseException, yaml.YAMLError) as e:
        raise CheckpointError(
            f"{ckpt}: {what} does not load ({_why(e)}); give a checkpoint written by this mtp-pretrain "
            "with the same parts"
        ) from e


def _engine_load(ckpt: Path, load: Callable[[], None]) -> None:
    """The engine's collective load; the checkpoint libraries' own refusals become a CheckpointError (they
    are raised on every rank: torch DCP gathers the ranks' failures, megatron validates the same metadata)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load()
    except (CheckpointingException, CheckpointException) as e:
        raise CheckpointError(
            f"{ckpt}: the engine's model/optimizer files do not load ({_why(e)}); "
            "resume from an earlier checkpoint or delete this one"
        ) from e


def _saved_config(ckpt: Path, common: dict) -> Config:
    with _loading(ckpt, "the config in trainer.pt"):  # not YAML of a Config this version knows
        return from_yaml(common["config"])


class CheckpointManager:
    """Saves and restores the engine's sharded state and the named ``parts`` / ``rank_parts``."""

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        parts: dict[str, Stateful],
        rank_parts: dict[str, Stateful],
        tokenizer_path: Path,
    ) -> None:
        self.cfg, self.engine, self.tokenizer_path = cfg, engine, Path(tokenizer_path)
        self.parts = {"engine": engine, **parts}
        self.rank_parts = rank_parts
        self.storage = Checkpointer(
            Path(cfg.trainer.run_dir) / "checkpoints",
            keep_last=cfg.trainer.keep_last,
            checksum=cfg.trainer.checkpoint_checksum,
        )

    def restore(self) -> None:
        """Continue this run from its newest valid checkpoint (or ``trainer.resume=PATH``, which must be
        valid: no fall-back); else, with ``trainer.init_from``, start from another run's weights; else start
        fresh. ``resume=auto`` with checkpoints of which none verifies is a CheckpointError, not a restart."""
        t = self.cfg.trainer
        ckpt = self.storage.latest() if t.resume == "auto" else None if t.resume == "none" else Path(t.resume)
        if ckpt is None and t.resume == "auto" and any(self.storage.root.glob("step_*")):
            # all broken (each reported on stderr): starting at step 0 would overwrite them, unasked
            raise CheckpointError(
                f"no checkpoint in {self.storage.root} passes verification (reasons above); to start this "
                "run afresh move them away or set trainer.resume=none"
            )
        if ckpt is not None:
            self.load(ckpt)
        elif t.init_from:
            self.init_from(Path(t.init_from))

    def save(self, step: int) -> Path:
        common = {name: part.state_dict() for name, part in self.parts.items()}
        common.update(
            config=OmegaConf.to_yaml(OmegaConf.structured(self.cfg)),
            tokenizer_hash=tokenizer_hash(self.tokenizer_path),
            tokenizer_json=self.tokenizer_path.read_text(),  # self-contained for export / generation
            versions=_versions(),
        )
        per_rank = {name: part.state_dict() for name, part in self.rank_parts.items()}
        return self.storage.save(step, self.engine.save, common=common, per_rank=per_rank)

    def load(self, ckpt: Path) -> None:
        """Resume from ``ckpt`` (verified first; every problem found is a CheckpointError on every rank)."""
        common, per_rank = self.storage.load(ckpt)  # trainer.pt read once

        def check() -> None:  # before the engine's collective load: a rank-file problem stops every rank
            _require(ckpt, "trainer.pt", common, (*self.parts, *_COMMON_KEYS))
            if per_rank is not None:
                _require(ckpt, f"rank_{parallel.rank():05d}.pt", per_rank, tuple(self.rank_parts))
            self._check_fits(ckpt, common, finetune=False)

        on_every_rank(check)
        _engine_load(ckpt, lambda: self.engine.load(ckpt))
        for name, part in self.parts.items():
            with _loading(ckpt, f"part {name!r} of trainer.pt"):
                part.load_state_dict(common[name])
        if per_rank is not None:
            for name, part in self.rank_parts.items():
                with _loading(ckpt, f"part {name!r} of rank_{parallel.rank():05d}.pt"):
                    part.load_state_dict(per_rank[name])
        if parallel.rank() == 0:
            print(f"resumed from {ckpt} at step {common['trainer']['step']}")
            if per_rank is None:
                print("  world size changed: RNG streams restart from the seed (they only drive dropout)")

    def init_from(self, ckpt: Path) -> None:
        """Model weights only (trunk + the first min(n, n_ckpt) heads); step 0, fresh optimizer and data."""
        common = self.storage.read_common(ckpt)
        _require(ckpt, "trainer.pt", common, _COMMON_KEYS)
        self._check_fits(ckpt, common, finetune=True)
        n_old = _saved_config(ckpt, common).mtp.n

        def keep(key: str) -> bool:
            return not _is_head_beyond(key, n_old)

        _engine_load(ckpt, lambda: self.engine.load_model_weights(ckpt, keep=keep))
        if parallel.rank() == 0:
            print(f"initialised from {ckpt}: trunk + heads 1..{min(n_old, self.cfg.mtp.n)} of its {n_old}")

    def _check_fits(self, ckpt: Path, common: dict, finetune: bool) -> None:
        if common["tokenizer_hash"] != tokenizer_hash(self.tokenizer_path):
            raise CheckpointError(
                f"{ckpt} was trained with another tokenizer; point data.* at the same corpus"
            )
        saved = _saved_config(ckpt, common)
        bad = finetune_mismatches(saved, self.cfg) if finetune else shape_mismatches(saved, self.cfg)
        if bad:
            hint = ""
            if not finetune and saved.mtp.n != self.cfg.mtp.n:
                hint = "; to start a run with another mtp.n from these weights use trainer.init_from=<checkpoint> in a new run_dir"
            raise CheckpointError(f"{ckpt} does not fit this model: {'; '.join(bad)}{hint}")
