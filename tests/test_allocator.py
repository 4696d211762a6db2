"""keep_freed_memory: freed buffers stay mapped, so a training-like loop stops page-faulting."""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys

import pytest

from moviegen.train.allocator import keep_freed_memory

# A buffer a little larger every round, written and freed, as activations of
# growing batches. glibc's default serves each round's buffer with fresh mmap
# pages (its threshold only rises to sizes already freed), so every page of it
# faults; kept memory faults only for the heap's growth. Prints faults per round.
_LOOP = """
import json, resource, sys
import torch
from moviegen.train.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def round_(number):
    torch.ones((8 * 2**20 + number * 2**16) // 4).mul_(2.0)  # 8 MiB + 64 KiB per round
for number in range(3):
    round_(number)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for number in range(3, 23):
    round_(number)
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"applied": applied, "faults_per_round": (after - before) / 20}))
"""

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "musl" in (ctypes.util.find_library("c") or ""),
    reason="glibc malloc settings",
)


def _faults(mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _LOOP, mode], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_buffers_are_reused_without_page_faults():
    default = _faults("default")
    kept = _faults("keep")
    assert kept["applied"] and not default["applied"]
    # An 8 MiB buffer is 2048 pages: glibc's defaults map all of them afresh
    # every round; kept memory faults mostly for the 16 pages the heap grows by
    # (16-240 faults per round measured, against 2249).
    assert default["faults_per_round"] > 2000
    assert kept["faults_per_round"] < default["faults_per_round"] / 5


@glibc_only
def test_keep_freed_memory_is_idempotent():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True
