"""Step time with trainer.deterministic on vs off (mtp_pretrain/bench/determinism.py)."""

from mtp_pretrain.bench.determinism import main

if __name__ == "__main__":
    main()
