"""GPU throughput of the 1B model, n=1 vs n=4: tokens/s, MFU, peak memory (mtp_pretrain/bench/gpu.py)."""

from mtp_pretrain.bench.gpu import main

if __name__ == "__main__":
    main()
