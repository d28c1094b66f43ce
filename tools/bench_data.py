"""Data-loader tokens/s over the training step's consumption (mtp_pretrain/bench/data.py)."""

from mtp_pretrain.bench.data import main

if __name__ == "__main__":
    main()
