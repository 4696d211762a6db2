"""The GPU throughput benchmark's code path, run on the CPU with a debug model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_t2v_throughput.py"
TINY = ["--recipe", "debug", "--frames", "2", "--size", "32", "--text-tokens", "8",
        "--text-dim", "16", "--no-compile", "--warmup", "1", "--steps", "2"]  # fmt: skip


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cpu_path_measures_tokens_per_second_and_mfu():
    result = run("--device", "cpu", *TINY, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])["result"]
    # 32 px / 8 = 4 latent rows and columns, patch 2x2 -> 2 x 2 x 2 tokens.
    assert report["video_tokens"] == 8
    assert report["step_s"] > 0 and report["tokens_per_s_per_gpu"] > 0
    assert 0 < report["mfu"] < 1


def test_without_cuda_it_says_how_to_run_on_cpu():
    if torch.cuda.is_available():
        return
    result = run(*TINY)
    assert "needs a CUDA GPU" in result.stdout + result.stderr
    assert "--device cpu" in result.stdout + result.stderr
