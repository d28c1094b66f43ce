"""Model code: trunk stages, MTP heads, the composed MegatronModule. Knows nothing of data or checkpoints."""
