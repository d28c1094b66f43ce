"""PeakMemory on CPU: the resident-set high-water mark of a block, above what was resident before it."""

import torch

from mtp_pretrain.bench.memory import PeakMemory, status_kib

MIB = 2**20


def test_status_fields_are_read():
    assert status_kib("VmRSS") > 0 and status_kib("VmHWM") >= status_kib("VmRSS")


def test_a_block_that_touches_64_mib_peaks_64_mib_above_its_start():
    # 64 MiB is above glibc's largest dynamic mmap threshold (32 MiB): the tensor gets fresh pages however
    # the test process's allocator is set up, so the resident set grows by at least its bytes
    with PeakMemory() as mem:
        block = torch.ones(64 * MIB // 4)
        del block
    assert mem.peak == mem.baseline + mem.added
    # lower bound: the tensor's own pages (less 1 MiB for page accounting); upper: the tensor plus 16 MiB
    # for what else torch and pytest may allocate while the block runs
    assert 63 * MIB <= mem.added <= 80 * MIB, mem.added / MIB


def test_the_mark_is_reset_at_each_start():
    with PeakMemory():
        big = torch.ones(64 * MIB // 4)
        del big
    with PeakMemory() as small:
        torch.ones(4)
    # the earlier 64 MiB peak is not this block's: its figure stays far below it (16 MiB: allocator noise)
    assert small.added < 16 * MIB, small.added / MIB
