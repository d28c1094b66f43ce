"""mtp-pretrain: distributed LLM pretraining with multi-token prediction on megatron-core."""

__version__ = "0.1.0"
