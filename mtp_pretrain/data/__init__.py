"""Data: offline tokenizer, shard writer and reader, packed-batch streams and loader, a run's data sources."""
