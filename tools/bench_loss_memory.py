"""Loss-step peak memory: naive vs memory-efficient vs chunked CE (mtp_pretrain/bench/loss_memory.py)."""

from mtp_pretrain.bench.process import pin_mmap_threshold

pin_mmap_threshold()  # re-executes this script with glibc's mmap threshold pinned: before torch loads

from mtp_pretrain.bench.loss_memory import main  # noqa: E402

if __name__ == "__main__":
    main()
