"""Run under torchrun (4 ranks: TP2 x DP2, 2 loader workers per rank): the trainer's data across ranks.

    torchrun --nproc-per-node=4 tests/distributed/data_resume.py OUT_DIR SOURCE_DIR

Trains the tiny run for 6 steps (checkpoints at 3 and 6), then resumes a copy of the step-3 checkpoint
in a second run directory and trains to step 6 again. Every rank records a hash of each training
micro-batch it consumed and its per-step losses; rank 0 writes them all to OUT_DIR/ranks.json for
tests/distributed/test_data_ranks.py. With DP2 and one validation shard, DP rank 1 validates on padding
only: validation must still run the same collectives on every rank (no hang).
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from mtp_pretrain import parallel
from mtp_pretrain.trainer import Trainer
from tests.conftest import compose_config, tiny_run_overrides

STEPS, RESUME_AT = 6, 3


def _run(source: Path, cache: Path, run_dir: Path) -> dict:
    overrides = tiny_run_overrides(
        source, cache, run_dir, **{"parallel.tp": 2, "data.num_workers": 2, "trainer.steps": STEPS,
                                   "trainer.save_every": RESUME_AT, "trainer.grad_accum": 2}
    )  # fmt: skip
    trainer = Trainer(compose_config(*overrides))
    consumed: list[str] = []
    micro_batches = trainer._micro_batches

    def recording(stream, count):
        for batch in micro_batches(stream, count):
            if stream is trainer.train_data:
                consumed.append(hashlib.sha1(batch[0].numpy().tobytes()).hexdigest()[:16])
            yield batch

    trainer._micro_batches = recording
    result = trainer.fit()
    return {"batches": consumed, "losses": result.losses, "val": result.val}


def main(out: Path, source: Path) -> None:
    parallel.init_distributed(tp=2, pp=1, seed=0)
    cache = out / "cache"
    full = _run(source, cache, out / "full")
    if parallel.rank() == 0:
        part = out / "part" / "checkpoints"
        part.mkdir(parents=True)
        shutil.copytree(out / "full" / "checkpoints" / f"step_{RESUME_AT:08d}", part / f"step_{RESUME_AT:08d}")
        (part / "latest").write_text(f"step_{RESUME_AT:08d}")
    torch.distributed.barrier()
    resumed = _run(source, cache, out / "part")
    record = {
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "full": full,
        "resumed": resumed,
    }
    gathered = [None] * parallel.world_size()
    torch.distributed.all_gather_object(gathered, record)
    if parallel.rank() == 0:
        (out / "ranks.json").write_text(json.dumps(gathered))
    parallel.destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
