"""The benchmarks: one module per benchmark, run through its entry point ``tools/bench_<name>.py``.

    suite         make bench: runs the benchmarks below as child processes, one table of ratios
    loss_memory   loss-step peak memory: naive vs memory-efficient vs chunked CE
    step          step time n=4 / n=1 over the FLOP ratio (same trunk)
    megatron_mtp  our MTP (parallel and sequential heads) vs megatron-core's built-in MTP: peak memory and
                  step time
    head_types    every mtp.head_type over parallel: training-step peak memory and step time
    engines       per-rank peak memory: megatron engine vs DeepSpeed ZeRO 1/2/3
    data          data-loader tokens/s over the training step's consumption
    decode        self-speculative vs greedy decoding
    gpu           1B bf16 throughput and MFU on a GPU (a tiny dry run on CPU)

What they share: process.py (child processes, torchrun, the world, glibc's mmap threshold), options.py
(command line, JSON, the Hydra config), models.py (bench models and training steps), timing.py (timed
steps), memory.py (peak memory), versus.py (models side by side in MegatronEngines: memory in a fresh
process each, step times interleaved). FLOPs and MFU come from mtp_pretrain.flops, as in the trainer.

Importing this package loads nothing: the memory benchmarks must re-execute before torch loads.
"""
