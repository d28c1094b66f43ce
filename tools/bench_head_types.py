"""The MTP head types (mtp.head_type), each over parallel: peak memory and step time of a training step
(mtp_pretrain/bench/head_types.py)."""

from mtp_pretrain.bench.head_types import main

if __name__ == "__main__":
    main()
