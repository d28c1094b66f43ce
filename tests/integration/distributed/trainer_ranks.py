"""Run under torchrun: the trainer on several ranks (data, resume, re-sharded resume, a stop signal).

    torchrun --nproc-per-node=4 tests/distributed/trainer_ranks.py save OUT_DIR SOURCE_DIR
    torchrun --nproc-per-node=2 tests/distributed/trainer_ranks.py reshard OUT_DIR SOURCE_DIR

``save`` (4 ranks):
  tp2dp2   6 steps, 2 loader workers per rank, checkpoints at 3 and 6; every rank records a hash of each
           training micro-batch it consumed and its losses. With DP2 and one validation shard, DP rank 1
           validates on padding only: every rank must still run the same collectives (no hang).
  resumed  a copy of tp2dp2's step-3 checkpoint resumed to step 6 (same layout).
  tp2pp2   the same run at TP2 x PP2 (checkpoint at 3), the reference of the re-sharded resumes.
  usr1     tp2dp2 again; rank 1 alone gets SIGUSR1 after step 2: all ranks must save and stop there.
``reshard`` (2 ranks): tp2pp2's step-3 checkpoint resumed at PP2 (TP and DP change), tp2dp2's at DP2 x TP1.
Rank 0 writes OUT_DIR/<mode>.json for tests/distributed/test_trainer_ranks.py (the single-process resumes
of the same checkpoints run there).
"""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from mtp_pretrain import parallel
from mtp_pretrain.trainer import Trainer
from tests.conftest import compose_config, tiny_run_overrides

STEPS, RESUME_AT = 6, 3


def overrides(source: Path, cache: Path, run_dir: Path, **extra) -> list[str]:
    base = {
        "data.num_workers": 2,
        "trainer.steps": STEPS,
        "trainer.save_every": RESUME_AT,
        "trainer.grad_accum": 2,
        "model.num_layers": 4,
    }  # a trunk of 2 blocks: PP2 splits it
    return tiny_run_overrides(source, cache, run_dir, **{**base, **extra})


def run(source: Path, cache: Path, run_dir: Path, signal_after: int | None = None, **extra) -> dict:
    trainer = Trainer(compose_config(*overrides(source, cache, run_dir, **extra)))
    consumed: list[str] = []
    micro_batches, train_step = trainer._micro_batches, trainer.engine.train_step

    def recording(stream, count):
        for batch in micro_batches(stream, count):
            if stream is trainer.train_data:
                consumed.append(hashlib.sha1(batch[0].numpy().tobytes()).hexdigest()[:16])
            yield batch

    def signalling(*args, **kw):
        if trainer.step + 1 == signal_after:  # arrives during step `signal_after`: every rank stops after it
            os.kill(os.getpid(), signal.SIGUSR1)
        return train_step(*args, **kw)

    trainer._micro_batches = recording
    trainer.engine.train_step = signalling
    result = trainer.fit()
    return {
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "last_stage": parallel_state.is_pipeline_last_stage(),
        "batches": consumed,
        "losses": result.losses,
        "val": result.val,
        "step": result.step,
        "stopped": result.stopped,
        "checkpoint": str(result.checkpoint),
    }


def gather(record: dict) -> list[dict]:
    every = [None] * parallel.world_size()
    torch.distributed.all_gather_object(every, record)
    return every


def main(mode: str, out: Path, source: Path) -> None:
    cache = out / "cache"
    results = {}
    if mode == "save":
        parallel.init_distributed(tp=2, pp=1, seed=0)
        results["tp2dp2"] = gather(run(source, cache, out / "tp2dp2", **{"parallel.tp": 2}))
        step3 = out / "tp2dp2" / "checkpoints" / f"step_{RESUME_AT:08d}"
        results["resumed"] = gather(
            run(source, cache, out / "resumed", **{"parallel.tp": 2, "trainer.resume": step3})
        )
        results["tp2pp2"] = gather(run(source, cache, out / "tp2pp2", **{"parallel.tp": 2, "parallel.pp": 2}))
        usr1 = {"parallel.tp": 2}
        results["usr1"] = gather(
            run(source, cache, out / "usr1", signal_after=2 if parallel.rank() == 1 else None, **usr1)
        )
    else:
        parallel.init_distributed(tp=1, pp=2, seed=0)
        ckpt = f"checkpoints/step_{RESUME_AT:08d}"
        results["tp2pp2@pp2"] = gather(
            run(
                source,
                cache,
                out / "tp2pp2-at-pp2",
                **{"parallel.pp": 2, "trainer.resume": out / "tp2pp2" / ckpt},
            )
        )
        results["tp2dp2@dp2"] = gather(
            run(source, cache, out / "tp2dp2-at-dp2", **{"trainer.resume": out / "tp2dp2" / ckpt})
        )
    if parallel.rank() == 0:
        (out / f"{mode}.json").write_text(json.dumps(results))
    parallel.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
