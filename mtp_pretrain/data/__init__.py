"""Data: offline tokenizer, webdataset shard writer, streaming packed-batch reader."""
