"""Core attention sdpa vs local: step time and peak memory at T and 2T (mtp_pretrain/bench/attention.py)."""

from mtp_pretrain.bench.process import pin_mmap_threshold

pin_mmap_threshold()  # re-executes this script with glibc's mmap threshold pinned: before torch loads

from mtp_pretrain.bench.attention import main  # noqa: E402

if __name__ == "__main__":
    main()
