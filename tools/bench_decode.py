"""Self-speculative vs greedy decoding on held-out prompts (mtp_pretrain/bench/decode.py)."""

from mtp_pretrain.bench.decode import main

if __name__ == "__main__":
    main()
