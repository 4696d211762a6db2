"""Does the outlier penalty loss remove latent outliers? Train twice and compare.

Trains the same TAE recipe on the same data, steps and seed twice, once with
the outlier penalty (weight ``--opl-weight``) and once without, then reports
on held-out clips the largest latent z-score (the OPL statistic: distance of a
latent vector from its frame's mean, in units of the frame's std norm), the
share of positions beyond 3, and the reconstruction PSNR.

Usage::

    python benchmarks/bench_tae_opl.py --data runs/demo/data/shapes [--steps 300]

``--data`` is a shapes dataset folder (``train.jsonl`` / ``val.jsonl``), e.g.
made with ``moviegen data shapes``; it is generated there if missing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from moviegen.data.shapes import generate_shapes_dataset
from moviegen.eval.reconstruction import evaluate_tae
from moviegen.tae.checkpoint import load_tae
from moviegen.train.tae_trainer import TAETrainer, resolve_config


def train_and_measure(data: Path, run: Path, *, recipe: str, steps: int, opl_weight: float) -> dict:
    config = resolve_config(
        recipe,
        train=str(data / "train.jsonl"),
        val=str(data / "val.jsonl"),
        overrides=[
            f"steps={steps}",
            f"loss.opl_weight={opl_weight}",
            "val_every=1000000",
            f"checkpoint_every={steps}",
        ],
    )
    TAETrainer(config, run, progress=True).train()
    report = evaluate_tae(load_tae(run), data / "val.jsonl", max_clips=32, progress=False)
    return {"opl_weight": opl_weight, "psnr": report.psnr, **report.latent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data/shapes"))
    parser.add_argument("--recipe", default="cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--opl-weight", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None, help="keep the two runs here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not (args.data / "train.jsonl").is_file():
        generate_shapes_dataset(args.data, num_clips=1024)
    with tempfile.TemporaryDirectory() as temporary:
        root = args.out or Path(temporary)
        rows = [
            train_and_measure(
                args.data, root / name, recipe=args.recipe, steps=args.steps, opl_weight=weight
            )
            for name, weight in (("without_opl", 0.0), ("with_opl", args.opl_weight))
        ]
    print(f"recipe {args.recipe}, {args.steps} steps each, same seed and data")
    print("| run | OPL weight | max latent z-score | share z > 3 | max abs latent | val PSNR |")
    print("|---|---|---|---|---|---|")
    for name, row in zip(("without OPL", "with OPL"), rows, strict=True):
        print(
            f"| {name} | {row['opl_weight']:g} | {row['max_zscore']:.2f} | "
            f"{row['frac_above_3']:.5f} | {row['max_abs']:.2f} | {row['psnr']:.2f} dB |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
