"""wandb sink: offline by default (``wandb sync`` later), one run id kept across resumes.

``wandb`` is imported only when a run is opened, so ranks and runs without wandb pay nothing. Any wandb
failure (no API key, no network, a broken install) becomes one warning and training goes on without it.
``logging.wandb_mode`` is validated by ``config.validate()``; this module trusts it.
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtp_pretrain.config import LoggingConfig
from mtp_pretrain.metrics.sink import warn

RUN_ID_FILE = "wandb_run_id.txt"


def new_run_id(length: int = 8) -> str:
    """A wandb-style run id (lowercase letters + digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


class WandbSink:
    """Logs ``{split}/{key}`` points against the trainer's own step; :meth:`open` starts or resumes the run."""

    def __init__(self, run: Any) -> None:
        self.run: Any = run
        run_files_dir = getattr(run, "dir", "") or ""  # <run_dir>/wandb/<run>/files
        self.wandb_dir = str(Path(run_files_dir).parent) if run_files_dir else ""

    @classmethod
    def open(cls, cfg: LoggingConfig, run_dir: Path, config_dict: dict | None) -> WandbSink | None:
        """The run in ``run_dir/wandb`` (resumed when ``run_dir`` has a run id), or None after a warning."""
        os.environ.setdefault("WANDB_SILENT", "true")
        id_file = Path(run_dir) / RUN_ID_FILE
        try:
            import wandb

            run_id = id_file.read_text().strip() if id_file.is_file() else ""
            run_id = run_id or new_run_id()
            run = wandb.init(
                mode=cfg.wandb_mode,
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=cfg.run_name,
                dir=str(run_dir),
                config=config_dict,
                id=run_id,
                resume="allow",
            )
            if run is None:
                raise RuntimeError("wandb.init returned None")
            # Own x-axis: points are keyed by trainer step, so re-logging steps after a resume from an
            # earlier checkpoint is not dropped by wandb's monotonic internal step.
            run.define_metric("trainer/step")
            run.define_metric("train/*", step_metric="trainer/step")
            run.define_metric("val/*", step_metric="trainer/step")
            id_file.write_text(run_id + "\n")
        except Exception as e:  # never crash training for metrics
            warn(f"wandb init failed ({type(e).__name__}: {e}); continuing without wandb")
            return None
        return cls(run)

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        if self.run is None:
            return
        payload: dict[str, float] = {f"{split}/{k}": v for k, v in metrics.items()}
        payload["trainer/step"] = step
        try:
            self.run.log(payload)
        except Exception as e:
            warn(f"wandb log failed ({type(e).__name__}: {e}); disabling wandb")
            self.run = None

    def close(self) -> dict[str, str]:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:
                warn(f"wandb finish failed ({type(e).__name__}: {e})")
            self.run = None
        return {"wandb": self.wandb_dir}
