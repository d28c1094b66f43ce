"""Training metrics: :class:`MetricsLogger` (the trainer's facade) and its sinks, one module each.

logger.py   MetricsLogger: window reduction, ETA, head-count check; picks the sinks from the config
sink.py     the MetricSink interface and the record format
console.py  lines, or a progress bar on a terminal
jsonl.py    <run_dir>/metrics.jsonl
wandb.py    wandb (lazy import, resumes by run id)
plot.py     loss curves from metrics.jsonl files (end of training and ``mtp-plot``)
"""

from mtp_pretrain.metrics.jsonl import JSONL_FILE
from mtp_pretrain.metrics.logger import MetricsLogger
from mtp_pretrain.metrics.plot import PLOT_FILE, build_head_series, load_history, plot_loss_curves
from mtp_pretrain.metrics.sink import MetricSink

__all__ = [
    "JSONL_FILE",
    "PLOT_FILE",
    "MetricSink",
    "MetricsLogger",
    "build_head_series",
    "load_history",
    "plot_loss_curves",
]
