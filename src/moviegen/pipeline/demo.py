"""`make demo`: the built-in end-to-end run on the shapes data.

Stages (each reused when its outputs exist, unless ``fresh``):
1. make the shapes dataset (train/val manifests and clips);
2. write a contact sheet PNG of clips with captions and an animated GIF grid;
3. train the CPU-size TAE on it (``runs/demo/tae``, a valid ``--checkpoint``);
4. measure its latent statistics into the checkpoint;
5. reconstruct held-out clips: a GIF of ground truth beside reconstruction.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from moviegen.data.manifest import read_manifest
from moviegen.data.shapes import generate_shapes_dataset
from moviegen.data.transforms import frames_to_tensor, to_uint8_frames
from moviegen.data.video_io import read_video, write_video
from moviegen.eval.reconstruction import evaluate_tae
from moviegen.eval.visualize import clip_grid, contact_sheet
from moviegen.tae.checkpoint import load_tae
from moviegen.tae.stats import store_latent_stats
from moviegen.train.tae_trainer import TAETrainer, resolve_config

__all__ = ["DemoConfig", "run_demo"]


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    num_clips: int = 1024  # shapes clips to generate (train + val)
    size: int = 64  # frame side in pixels
    num_frames: int = 16
    fps: int = 8
    seed: int = 0
    val_fraction: float = 0.1
    num_preview_clips: int = 8  # rows in the contact sheet and tiles in the GIF
    tae_recipe: str = "cpu"  # TAE training recipe
    tae_time_budget_s: float = 420.0  # TAE training time (the recipe's steps cap it too)
    fresh: bool = False  # start over instead of reusing finished stages


def _shapes_stage(config: DemoConfig, log) -> Path:
    data_dir = config.out / "data" / "shapes"
    stamp = data_dir / "demo_stage.json"
    params = {
        key: getattr(config, key)
        for key in ("num_clips", "size", "num_frames", "fps", "seed", "val_fraction")
    }
    if not config.fresh and stamp.is_file() and json.loads(stamp.read_text()) == params:
        log(f"[1/5] shapes dataset: reusing {data_dir}")
        return data_dir
    if data_dir.exists():
        shutil.rmtree(data_dir)
    log(f"[1/5] shapes dataset: generating {config.num_clips} clips into {data_dir}")
    generate_shapes_dataset(
        data_dir,
        num_clips=config.num_clips,
        size=config.size,
        num_frames=config.num_frames,
        fps=config.fps,
        seed=config.seed,
        val_fraction=config.val_fraction,
    )
    # Written last: its presence means the stage finished.
    stamp.write_text(json.dumps(params, indent=2))
    return data_dir


def _preview_stage(config: DemoConfig, data_dir: Path, log) -> tuple[Path, Path]:
    log("[2/5] preview: contact sheet and GIF")
    records = read_manifest(data_dir / "train.jsonl")[: config.num_preview_clips]
    clips = [(read_video(record.path), record.caption) for record in records]
    sheet = contact_sheet(clips, config.out / "shapes_contact_sheet.png")
    grid = clip_grid([frames for frames, _ in clips], columns=4, scale=2)
    gif = write_video(config.out / "shapes_preview.gif", grid, fps=config.fps)
    return sheet, gif


def _tae_stage(config: DemoConfig, data_dir: Path, log) -> Path:
    run = config.out / "tae"
    done = run / "demo_stage.json"
    params = {"recipe": config.tae_recipe, "budget": config.tae_time_budget_s}
    if not config.fresh and done.is_file() and json.loads(done.read_text()) == params:
        log(f"[3/5] TAE: reusing {run}")
        return run
    if config.fresh and run.exists():
        shutil.rmtree(run)
    log(
        f"[3/5] TAE: training the {config.tae_recipe!r} recipe for up to "
        f"{config.tae_time_budget_s:.0f} s into {run}"
    )
    tae_config = resolve_config(
        config.tae_recipe,
        train=str(data_dir / "train.jsonl"),
        val=str(data_dir / "val.jsonl"),
        overrides=[f"time_budget_s={config.tae_time_budget_s}"],
    )
    logs = TAETrainer(tae_config, run).train()
    log(f"      val PSNR {logs['val/psnr']:.2f} dB, SSIM {logs['val/ssim']:.4f}")
    done.write_text(json.dumps(params))
    return run


def _stats_stage(run: Path, data_dir: Path, log) -> None:
    log("[4/5] TAE latent statistics")
    store_latent_stats(run, data_dir / "train.jsonl")


def _reconstruction_stage(config: DemoConfig, run: Path, data_dir: Path, log) -> tuple[Path, float]:
    log("[5/5] TAE reconstructions of held-out clips")
    tae = load_tae(run)
    report = evaluate_tae(tae, data_dir / "val.jsonl", progress=False)
    records = read_manifest(data_dir / "val.jsonl")[:4]
    tiles = []
    for record in records:
        frames = read_video(record.path)
        reconstruction = tae.reconstruct(frames_to_tensor(frames)[None])
        tiles += [frames, to_uint8_frames(reconstruction[0])]
    grid = clip_grid(tiles, columns=2, scale=2)
    gif = write_video(config.out / "tae_reconstruction.gif", grid, fps=config.fps)
    return gif, report.psnr


def run_demo(config: DemoConfig, log=print) -> dict[str, Path]:
    """Run every demo stage and return the paths of what it made."""
    config.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data_dir = _shapes_stage(config, log)
    timings["shapes dataset"] = time.perf_counter() - start
    start = time.perf_counter()
    sheet, gif = _preview_stage(config, data_dir, log)
    timings["preview"] = time.perf_counter() - start
    start = time.perf_counter()
    tae_run = _tae_stage(config, data_dir, log)
    timings["TAE training"] = time.perf_counter() - start
    start = time.perf_counter()
    _stats_stage(tae_run, data_dir, log)
    timings["latent stats"] = time.perf_counter() - start
    start = time.perf_counter()
    reconstruction_gif, val_psnr = _reconstruction_stage(config, tae_run, data_dir, log)
    timings["reconstruction"] = time.perf_counter() - start
    outputs = {
        "train manifest": data_dir / "train.jsonl",
        "val manifest": data_dir / "val.jsonl",
        "contact sheet": sheet,
        "preview gif": gif,
        "TAE run": tae_run,
        "TAE loss curves": tae_run / "loss_curves.png",
        "reconstruction": reconstruction_gif,
    }
    (config.out / "demo_config.json").write_text(
        json.dumps(
            {k: os.fspath(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            indent=2,
        )
    )
    log("")
    log(f"{'stage':<20}{'seconds':>10}")
    for stage, seconds in timings.items():
        log(f"{stage:<20}{seconds:>10.1f}")
    log("")
    log(f"TAE held-out PSNR: {val_psnr:.2f} dB")
    for name, path in outputs.items():
        log(f"{name:<16} {path}")
    return outputs
