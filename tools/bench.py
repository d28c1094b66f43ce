"""The benchmark suite (`make bench`): every benchmark, one table of ratios (mtp_pretrain/bench/suite.py)."""

from mtp_pretrain.bench.suite import main

if __name__ == "__main__":
    main()
