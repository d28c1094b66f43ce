"""Step time n=4 / n=1 on the same trunk over the FLOP ratio (mtp_pretrain/bench/step.py)."""

from mtp_pretrain.bench.step import main

if __name__ == "__main__":
    main()
