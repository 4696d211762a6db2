"""TAE recipe variants on the shapes data: held-out PSNR and what the shapes scorer reads.

Trains the ``cpu`` TAE recipe once per variant (a list of ``--set``-style
overrides) for a fixed number of steps, then reconstructs held-out clips and
reports PSNR together with the shapes scorer's per-attribute accuracy on the
reconstructions. The scorer shows *what* a TAE loses (colour, shape, motion),
which PSNR alone does not; a TAE whose reconstructions the scorer cannot read
caps the prompt adherence any text-to-video model trained on its latents can
reach.

Variants with equal step counts are compared at equal steps, so they may run
with ``--threads 1`` side by side in two processes without skewing the result;
timings are only meaningful for a process that has the machine to itself.

Usage::

    python benchmarks/bench_tae_shapes.py --data runs/demo/data/shapes --steps 200 \
        --variant base= --variant det=sample_posterior=false \
        --variant lr4e-3=lr=4e-3 [--clips 48] [--threads 2] [--out /tmp/tae_shapes] [--json]

``--variant NAME=KEY=VALUE[,KEY=VALUE...]`` (``NAME=`` for the plain recipe).
``--run NAME=RUN_FOLDER`` evaluates an already trained TAE run instead (no
training; its ``train s`` column is empty), e.g. ``--run demo=runs/demo/tae``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moviegen.data.manifest import read_manifest
from moviegen.data.shapes import ShapeAttributes
from moviegen.data.transforms import frames_to_tensor, to_uint8_frames
from moviegen.data.video_io import read_video
from moviegen.eval.metrics import psnr
from moviegen.eval.shapes_score import analyse_video, score_video
from moviegen.tae.checkpoint import load_tae
from moviegen.train.tae_trainer import TAETrainer, resolve_config

ATTRIBUTES = ("colour", "shape", "size", "direction", "all_correct")
EVAL_BATCH = 4
# Kinds whose fill ratio (foreground / bounding box) the table reports: the
# scorer's misses are small squares and triangles whose corners the TAE (and
# then the transformer) rounds towards a circle's 0.785.
FILL_KINDS = (("small", "square"), ("small", "triangle"))


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=KEY=VALUE,KEY=VALUE`` -> ``(NAME, [KEY=VALUE, ...])``; commas inside
    JSON brackets belong to the value (``model.patch_size=[2,2,2]``)."""
    name, _, overrides = text.partition("=")
    if not name:
        raise SystemExit(f"--variant needs NAME=OVERRIDES, got {text!r}")
    items, current, depth = [], "", 0
    for char in overrides + ",":
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return name, [item for item in items if item]


@torch.no_grad()
def evaluate(run: Path, val_manifest: Path, num_clips: int) -> dict:
    tae = load_tae(run)
    records = read_manifest(val_manifest)[:num_clips]
    psnrs, hits = [], dict.fromkeys(ATTRIBUTES, 0)
    fills: dict[str, list[float]] = {f"{size} {kind}": [] for size, kind in FILL_KINDS}
    for start in range(0, len(records), EVAL_BATCH):
        chunk = records[start : start + EVAL_BATCH]
        video = torch.stack([frames_to_tensor(read_video(record.path)) for record in chunk])
        reconstruction = tae.reconstruct(video)
        psnrs += psnr(reconstruction, video).tolist()
        for record, clip in zip(chunk, reconstruction, strict=True):
            frames = to_uint8_frames(clip)
            expected = ShapeAttributes.from_caption(record.caption)
            result = score_video(frames, expected)
            for key in ATTRIBUTES:
                hits[key] += bool(result[key])
            kind = f"{expected.size} {expected.shape}"
            fill = analyse_video(frames).fill_ratio if kind in fills else None
            if fill is not None:
                fills[kind].append(fill)
    return {
        "psnr": sum(psnrs) / len(psnrs),
        "scorer_on_reconstructions": {key: hits[key] / len(records) for key in ATTRIBUTES},
        "median_fill": {kind: statistics.median(v) if v else None for kind, v in fills.items()},
        "clips": len(records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data/shapes"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE,...")
    parser.add_argument(
        "--run", action="append", default=[], help="NAME=RUN_FOLDER: evaluate, do not train"
    )
    parser.add_argument("--clips", type=int, default=48, help="held-out clips evaluated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_tae_shapes"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [text.rpartition("=")[::2] for text in args.run]  # names may hold "="
    if any(not name or not folder for name, folder in runs):
        raise SystemExit(f"--run needs NAME=RUN_FOLDER, got {args.run}")
    variants = [parse_variant(text) for text in args.variant or ([] if runs else ["base="])]
    results = []
    for name, folder in runs:
        result = {"variant": name, "overrides": [f"run {folder}"], "train_s": None}
        result.update(evaluate(Path(folder), args.data / "val.jsonl", args.clips))
        results.append(result)
    for name, overrides in variants:
        config = resolve_config(
            "cpu",
            train=str(args.data / "train.jsonl"),
            overrides=[f"steps={args.steps}", "val_every=1000000", *overrides],
        )
        run = args.out / name
        started = time.perf_counter()
        TAETrainer(config, run, progress=False).train()
        seconds = time.perf_counter() - started
        result = {"variant": name, "overrides": overrides, "train_s": seconds}
        result.update(evaluate(run, args.data / "val.jsonl", args.clips))
        results.append(result)
    trained = f"variants: cpu TAE recipe, {args.steps} steps, " if variants else ""
    print(f"{trained}{args.threads} threads; scorer on {args.clips} reconstructed held-out clips")
    fill_names = [f"{size} {kind}" for size, kind in FILL_KINDS]
    print(
        "| variant | overrides | train s | PSNR dB | colour | shape | size | direction | all | "
        + " | ".join(f"{name} fill" for name in fill_names)
        + " |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(fill_names))
    for result in results:
        score = result["scorer_on_reconstructions"]
        cells = " | ".join(f"{score[key]:.0%}" for key in ATTRIBUTES)
        fill = result["median_fill"]
        fill_cells = " | ".join("" if fill[n] is None else f"{fill[n]:.3f}" for n in fill_names)
        overrides = ", ".join(result["overrides"]) or "(recipe)"
        seconds = "" if result["train_s"] is None else f"{result['train_s']:.0f}"
        print(
            f"| {result['variant']} | {overrides} | {seconds} | {result['psnr']:.2f} | {cells} "
            f"| {fill_cells} |"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
