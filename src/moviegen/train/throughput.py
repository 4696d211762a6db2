"""Throughput diagnostics: the machine's matmul FLOP/s and model FLOPs utilisation."""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["measure_matmul_flops", "model_flops_utilisation"]

# Square matmul used to measure the machine, and how often it is repeated.
MATMUL_SIZE = 1024
MATMUL_REPEATS = 5


def measure_matmul_flops(
    *,
    size: int = MATMUL_SIZE,
    repeats: int = MATMUL_REPEATS,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> float:
    """Achieved FLOP/s of a ``size x size`` matmul (median of ``repeats`` runs).

    On a CPU this is the practical peak the MFU of a training step is measured
    against (vendor peaks are not reachable from PyTorch there).
    """
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.matmul(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def model_flops_utilisation(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Achieved model FLOP/s (``flops_per_step / step_seconds``) over ``peak_flops``."""
    if step_seconds <= 0 or peak_flops <= 0:
        raise ValueError("step_seconds and peak_flops must be positive")
    return flops_per_step / step_seconds / peak_flops
