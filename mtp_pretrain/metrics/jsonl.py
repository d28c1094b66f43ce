"""``<run_dir>/metrics.jsonl`` sink: one JSON record per emitted point, appended across resumes.

Each line is ``{"split", "step", "time", **metrics}`` (:func:`~mtp_pretrain.metrics.sink.make_record`).
The file is opened per record, so a crash loses at most the line being written (``load_history`` skips a
torn last line) and a resumed run simply appends; ``load_history`` resolves the re-logged steps.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from mtp_pretrain.metrics.sink import make_record, warn

JSONL_FILE = "metrics.jsonl"


class JsonlSink:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(make_record(split, step, metrics)) + "\n")
        except OSError as e:
            warn(f"could not append to {self.path} ({e})")

    def close(self) -> dict[str, str]:
        return {}
