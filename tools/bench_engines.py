"""Per-rank peak memory: megatron engine vs DeepSpeed ZeRO 1/2/3 (mtp_pretrain/bench/engines.py)."""

from mtp_pretrain.bench.process import pin_mmap_threshold

pin_mmap_threshold()  # re-executes this script with glibc's mmap threshold pinned: before torch loads

from mtp_pretrain.bench.engines import main  # noqa: E402

if __name__ == "__main__":
    main()
