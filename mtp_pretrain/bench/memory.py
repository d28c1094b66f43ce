"""Peak memory of a block of code: the one method every memory benchmark uses.

On a GPU: torch.cuda.reset_peak_memory_stats, then max_memory_allocated. On CPU: Linux's resident-set
high-water mark (VmHWM), reset to the current resident set by writing "5" to /proc/self/clear_refs. The CPU
figure follows live tensor bytes only when glibc returns freed tensors to the OS: the process must run with
the mmap threshold pinned low (process.pin_mmap_threshold, before torch loads).
"""

from __future__ import annotations

import gc
import re
from types import TracebackType

import torch


def status_kib(field: str) -> int:
    """A KiB figure of /proc/self/status (VmRSS: resident now, VmHWM: resident high-water mark)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


class PeakMemory:
    """``with PeakMemory() as mem: ...``: afterwards ``mem.peak`` is the highest memory held during the block
    (bytes allocated by torch on a GPU, the process's resident set on CPU), ``mem.baseline`` what was held
    when it started and ``mem.added`` the block's own peak, ``peak - baseline``."""

    baseline: int
    peak: int

    def __enter__(self) -> PeakMemory:
        gc.collect()  # models, engines and optimizers of an earlier measurement hold each other in cycles
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # an earlier measurement's cached blocks: room for this one's
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.baseline = status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the high-water mark starts again from the current resident set
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = status_kib("VmHWM") * 1024

    @property
    def added(self) -> int:
        return self.peak - self.baseline
