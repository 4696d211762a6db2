"""Where a ``cpu``-recipe TAE training step goes, and what the two speed-ups buy.

1. The norm: the fused pixel RMS norm of :mod:`moviegen.tae.model` (a custom
   autograd function) against ``F.rms_norm`` + bias, whose decomposition
   autograd records op by op on CPU. Timed on the whole training step of the
   ``cpu`` TAE (reconstruction loss of the recipe, backward, AdamW) on one
   video batch of the recipe's shape (4 clips, 16 frames, 32 px crops),
   interleaved (fused, plain, fused, ...), medians.
2. The data: the TAE trainer's batches (decode, bucket, content-aware crops)
   with and without the decoded-clip cache (``data.cache_mib``), from the
   second epoch on (the first fills the cache), on a shapes manifest.

Usage::

    python benchmarks/bench_tae_train_step.py --data runs/demo/data/shapes \\
        [--repeats 15] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import moviegen.tae.model as tae_model
from bench_tae_temporal_conv import interleaved  # medians, round robin
from moviegen.tae.losses import TAELoss
from moviegen.train.tae_trainer import TAETrainer, resolve_config, tae_train_recipe

BATCH, FRAMES, CROP = 4, 16, 32
CACHE_MIB = 1024
# Batches timed from the second epoch (922 clips / 4 per batch = 231 per epoch).
WARM_BATCHES, TIMED_BATCHES = 300, 100


class PlainPixelRMSNorm(tae_model.PixelRMSNorm):
    """The norm as it was: ``F.rms_norm`` on the channels-last view, plus the bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), self.weight, self.eps)
        return (out + self.bias).permute(0, 4, 1, 2, 3)


def step_function(norm_class: type) -> Callable[[], None]:
    """One training step of a fresh ``cpu`` TAE built with ``norm_class``."""
    original = tae_model.PixelRMSNorm
    tae_model.PixelRMSNorm = norm_class
    try:
        recipe = tae_train_recipe("cpu")
        torch.manual_seed(0)
        model = tae_model.TAE(recipe.model)
    finally:
        tae_model.PixelRMSNorm = original
    loss = TAELoss(recipe.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    video = torch.rand(BATCH, 3, FRAMES, CROP, CROP, generator=torch.Generator().manual_seed(0))
    video = video * 2 - 1

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        reconstruction, mean, logvar = model(video, sample=True)
        total, _ = loss.generator_loss(video, reconstruction, mean, logvar, mean, step=0)
        total.backward()
        optimizer.step()

    return step


def norm_rows(repeats: int) -> list[dict]:
    medians = interleaved(
        {"fused": step_function(tae_model.PixelRMSNorm), "plain": step_function(PlainPixelRMSNorm)},
        repeats,
    )
    fused, plain = medians["fused"], medians["plain"]
    return [
        {"what": "cpu TAE video step, plain F.rms_norm", "ms": plain * 1e3, "speedup": None},
        {"what": "cpu TAE video step, fused norm", "ms": fused * 1e3, "speedup": plain / fused},
    ]


def loader_ms(data: Path, cache_mib: float) -> float:
    config = resolve_config(
        "cpu",
        train=str(data / "train.jsonl"),
        val=None,
        size=64,
        overrides=[f"data.cache_mib={cache_mib}"],
    )
    with tempfile.TemporaryDirectory() as run:
        trainer = TAETrainer(config, run, progress=False)
        batches = trainer._batches()
        for index in range(WARM_BATCHES + TIMED_BATCHES):
            if index == WARM_BATCHES:
                started = time.perf_counter()
            trainer._random_crop(next(batches), index, 0)
        return (time.perf_counter() - started) / TIMED_BATCHES * 1e3


def loader_rows(data: Path) -> list[dict]:
    plain = loader_ms(data, 0)
    cached = loader_ms(data, CACHE_MIB)
    return [
        {"what": "trainer batch (decode + crops), no cache", "ms": plain, "speedup": None},
        {"what": f"trainer batch, cache_mib={CACHE_MIB}", "ms": cached, "speedup": plain / cached},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="shapes folder with train.jsonl (for the loader)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = norm_rows(args.repeats)
    if args.data is not None:
        rows += loader_rows(args.data)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.threads} threads, medians of {args.repeats} interleaved steps")
    print("| what | ms | speed-up |\n|---|---:|---:|")
    for row in rows:
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] else ""
        print(f"| {row['what']} | {row['ms']:.1f} | {speedup} |")


if __name__ == "__main__":
    main()
