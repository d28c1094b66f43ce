"""Our MTP vs megatron-core's built-in MTP: peak memory and step time (mtp_pretrain/bench/megatron_mtp.py)."""

from mtp_pretrain.bench.megatron_mtp import main

if __name__ == "__main__":
    main()
