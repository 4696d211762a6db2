"""`make demo`: the built-in end-to-end text-to-video run on the shapes data.

From nothing, on a 2-core CPU (stages reuse their finished outputs unless
``fresh``; a stage's stamp file is written last and records its settings):

1. make the shapes dataset (train/val manifests and clips);
2. write a contact sheet PNG of training clips with captions and a GIF grid;
3. train the CPU-size TAE (``runs/demo/tae``, a valid ``--checkpoint``);
4. measure its latent statistics into the checkpoint;
5. reconstruct held-out clips: PSNR and a GIF of ground truth beside reconstruction;
6. precompute latents and MiniLM caption features (``runs/demo/latents``);
7. train the tiny transformer (``runs/demo/t2v``, a valid ``--checkpoint``);
8. sample all 144 canonical captions (``runs/demo/samples`` + ``prompts.jsonl``);
9. score prompt adherence with the shapes scorer, and write a contact sheet of
   samples with their captions, a few GIFs and MP4s.

It prints a timing table and the score, and writes both to ``runs/demo/summary.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from moviegen.data.manifest import read_manifest
from moviegen.data.precompute import PrecomputeConfig, precompute
from moviegen.data.shapes import canonical_captions, generate_shapes_dataset
from moviegen.data.transforms import frames_to_tensor, to_uint8_frames
from moviegen.data.video_io import read_video, write_video
from moviegen.eval.reconstruction import evaluate_tae
from moviegen.eval.shapes_score import score_samples
from moviegen.eval.visualize import clip_grid, contact_sheet
from moviegen.flow.guidance import check_interval
from moviegen.pipeline.sample import SamplingOptions, TextToVideoPipeline, sample_to_folder
from moviegen.tae.checkpoint import load_tae
from moviegen.tae.stats import store_latent_stats
from moviegen.text import default_text_encoders
from moviegen.train.t2v_trainer import T2VTrainer, resolve_t2v_config
from moviegen.train.tae_trainer import TAETrainer, resolve_config

__all__ = ["DemoConfig", "run_demo", "sample_captions"]

NUM_STAGES = 9
STAMP_FILE = "demo_stage.json"
# Held-out clips reconstructed for the PSNR line and the GIF.
NUM_RECONSTRUCTION_CLIPS = 8
NUM_RECONSTRUCTION_TILES = 4
# Sample videos also written as GIF/MP4 grids, and rows of the sample contact sheet.
NUM_SAMPLE_EXAMPLES = 8
NUM_SHEET_ROWS = 12
# Prompts solved at once when sampling the 144 captions (larger batches use the
# 2 cores better; 48 divides 144).
SAMPLE_BATCH_SIZE = 48
# Layout of the GIF/MP4 grids: tiles per row and nearest-neighbour upscaling.
GRID_COLUMNS = 4
GRID_SCALE = 2


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    num_clips: int = 1024  # shapes clips to generate (train + val)
    size: int = 64  # frame side in pixels
    num_frames: int = 16
    fps: int = 8
    seed: int = 0
    val_fraction: float = 0.1
    # Lossless FFV1 clips: the data decode to the same pixels in every run.
    # libx264 gave different bitstreams for 16 of the 1024 H.264 clips between
    # two fresh demo runs, and with other pixels every training after differs.
    lossless_data: bool = True
    num_preview_clips: int = 8  # rows in the contact sheet and tiles in the GIF
    tae_recipe: str = "cpu"  # TAE training recipe
    # Training time of the TAE and the transformer together. The TAE may take
    # up to `tae_time_budget_s` of it and the transformer what the TAE left, up
    # to `t2v_time_budget_s`: on a busy or slower machine the TAE still gets
    # its steps (a TAE cut short costs the transformer more: 84.7% all correct
    # after 1434 of 1600 TAE steps, docs/BENCHMARKS.md) and the transformer
    # ends a shorter schedule. Both schedules are fitted to their budgets
    # (`fit_schedule_to_budget`): a run that lags its budget's pace by more
    # than 5% does fewer steps but still ends its cosine. The 725 s bound the
    # demo: a fresh-clone `make demo` with 750 s took 14 min 54 s on a slow
    # stretch of this machine (the other stages 100 s and the install 60 s
    # there, ~65 s and ~50 s usually); at its usual speed the TAE takes
    # 270-285 s and the transformer ~440 s of the remaining 440-455 s.
    training_budget_s: float = 725.0
    tae_time_budget_s: float = 330.0
    # Optimizer steps (the cosine's length); None: the recipe's (TAE 1600,
    # transformer 2700; a slower machine ends the cosines inside the budgets).
    tae_steps: int | None = None
    stats_clips: int = 128  # clips the latent statistics are measured on
    t2v_recipe: str = "tiny"  # transformer training recipe
    t2v_time_budget_s: float = 460.0  # at most; see training_budget_s
    t2v_steps: int | None = None  # None: the recipe's
    # Fewer than the paper's 50: on the demo's models 30 Euler steps score
    # within a sample or two of 50 (91.7% vs 92.4%) and of 15 Heun steps.
    sample_steps: int = 30
    # Weak guidance: on a transformer trained this long, 1.5 scores 91.7%
    # all correct, 2 86.1% and 3 72.2% (stronger guidance rounds squares and
    # turns circles into diamonds); 1 (no guidance) 88.9%.
    cfg_scale: float = 1.5
    # Flow times (0 noise, 1 data) at which guidance applies; see
    # moviegen.flow.guidance.
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    # Stochastic Euler sampling (SamplingOptions.eta; 0: the ODE). Ancestral
    # (1) on four trained demo models, seeds 0/1000/2000 each: 96.0, 95.4, 95.8
    # and 93.8% mean all correct against 93.5, 92.6, 93.3 and 92.9% for the
    # ODE; 11 of 12 seeds up or equal (docs/BENCHMARKS.md). Same solver steps,
    # so the same time.
    sample_eta: float = 1.0
    fresh: bool = False  # start over instead of reusing finished stages

    def t2v_budget_s(self, tae_seconds: float) -> float:
        """The transformer's training seconds after a TAE that trained ``tae_seconds``."""
        budget = min(self.t2v_time_budget_s, self.training_budget_s - tae_seconds)
        if budget <= 0:
            raise ValueError(
                f"the TAE trained {tae_seconds:.0f} s of the {self.training_budget_s:g} s "
                "training budget and left none for the transformer"
            )
        return budget

    def sampling_options(self, **changes: Any) -> SamplingOptions:
        """How the demo samples its captions (clip geometry, solver steps,
        guidance), with ``changes`` to any ``SamplingOptions`` field."""
        options = dict(
            num_frames=self.num_frames,
            height=self.size,
            width=self.size,
            fps=self.fps,
            steps=self.sample_steps,
            cfg_scale=self.cfg_scale,
            cfg_interval=self.cfg_interval,
            eta=self.sample_eta,
        )
        return SamplingOptions(**{**options, **changes})

    def __post_init__(self) -> None:
        for name in ("training_budget_s", "tae_time_budget_s", "t2v_time_budget_s", "cfg_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.training_budget_s > self.tae_time_budget_s:
            raise ValueError(
                f"training_budget_s ({self.training_budget_s:g}) must exceed tae_time_budget_s "
                f"({self.tae_time_budget_s:g}): the transformer trains in what the TAE leaves"
            )
        for name in ("tae_steps", "t2v_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(
                    f"{name} must be at least 1 (or None for the recipe's), got {value}"
                )
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be at least 1, got {self.sample_steps}")
        if not 0.0 <= self.sample_eta <= 1.0:
            raise ValueError(f"sample_eta must be in [0, 1], got {self.sample_eta}")
        object.__setattr__(self, "cfg_interval", check_interval(self.cfg_interval))


class _Stages:
    """Numbered stage logging, stamps and timings."""

    def __init__(self, config: DemoConfig, log: Callable[[str], None]):
        self.config = config
        self.log = log
        self.timings: dict[str, float] = {}
        self.number = 0

    def run(self, name: str, folder: Path | None, params: dict[str, Any], work: Callable[[], Any]):
        """Run ``work`` unless ``folder``'s stamp records the same ``params``."""
        self.number += 1
        prefix = f"[{self.number}/{NUM_STAGES}] {name}"
        started = time.perf_counter()
        stamp = folder / STAMP_FILE if folder is not None else None
        if (
            stamp is not None
            and not self.config.fresh
            and stamp.is_file()
            and json.loads(stamp.read_text()).get("params") == params
        ):
            self.log(f"{prefix}: reusing {folder}")
            result = json.loads(stamp.read_text()).get("result")
        else:
            if folder is not None and folder.exists():
                shutil.rmtree(folder)
            self.log(prefix)
            result = work()
            if stamp is not None:  # written last: its presence means the stage finished
                stamp.parent.mkdir(parents=True, exist_ok=True)
                stamp.write_text(json.dumps({"params": params, "result": result}, indent=2))
        self.timings[name] = time.perf_counter() - started
        return result


def _preview(config: DemoConfig, data_dir: Path) -> dict[str, str]:
    records = read_manifest(data_dir / "train.jsonl")[: config.num_preview_clips]
    clips = [(read_video(record.path), record.caption) for record in records]
    sheet = contact_sheet(clips, config.out / "shapes_contact_sheet.png")
    grid = clip_grid([frames for frames, _ in clips], columns=GRID_COLUMNS, scale=GRID_SCALE)
    gif = write_video(config.out / "shapes_preview.gif", grid, fps=config.fps)
    return {"sheet": str(sheet), "gif": str(gif)}


def _reconstruct(config: DemoConfig, run: Path, data_dir: Path) -> dict[str, Any]:
    tae = load_tae(run)
    report = evaluate_tae(
        tae, data_dir / "val.jsonl", max_clips=NUM_RECONSTRUCTION_CLIPS, progress=False
    )
    tiles = []
    for record in read_manifest(data_dir / "val.jsonl")[:NUM_RECONSTRUCTION_TILES]:
        frames = read_video(record.path)
        reconstruction = tae.reconstruct(frames_to_tensor(frames)[None])
        tiles += [frames, to_uint8_frames(reconstruction[0])]
    grid = clip_grid(tiles, columns=2, scale=GRID_SCALE)  # original | reconstruction
    gif = write_video(config.out / "tae_reconstruction.gif", grid, fps=config.fps)
    return {"gif": str(gif), "psnr": report.psnr, "ssim": report.ssim}


def _steps_override(steps: int | None) -> list[str]:
    return [] if steps is None else [f"steps={steps}"]


def sample_captions(
    pipeline: TextToVideoPipeline,
    out: Path,
    *,
    seed: int,
    options: SamplingOptions,
    progress: bool = True,
) -> list[Path]:
    """The 144 canonical shapes captions into ``out`` (videos and
    ``prompts.jsonl``, caption ``i`` with seed ``seed + i``), as the demo
    samples them; what ``moviegen eval shapes`` scores."""
    return sample_to_folder(
        pipeline,
        canonical_captions(),
        out,
        seed=seed,
        options=options,
        batch_size=SAMPLE_BATCH_SIZE,
        progress=progress,
    )


def _sample(config: DemoConfig, t2v_run: Path, samples: Path) -> dict[str, Any]:
    pipeline = TextToVideoPipeline.from_checkpoint(t2v_run)
    started = time.perf_counter()
    paths = sample_captions(pipeline, samples, seed=config.seed, options=config.sampling_options())
    seconds = time.perf_counter() - started
    return {"num_videos": len(paths), "seconds_per_video": seconds / len(paths)}


def spread_indices(length: int, count: int) -> list[int]:
    """``count`` indices spread evenly from ``0`` to ``length - 1`` (all of them if fewer).

    With the 144 canonical captions and 12 rows that is every 13th caption, so
    size, colour, shape and direction all vary down the contact sheet; every
    12th would repeat one shape and direction (the caption list's inner loops).
    """
    count = min(count, length)
    if count <= 1:
        return list(range(count))
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)})


def _showcase(config: DemoConfig, samples: Path) -> dict[str, str]:
    """A contact sheet of samples with captions, and GIF/MP4 grids of a few."""
    lines = [json.loads(line) for line in (samples / "prompts.jsonl").read_text().splitlines()]
    chosen = [lines[index] for index in spread_indices(len(lines), NUM_SHEET_ROWS)]
    clips = [(read_video(samples / line["path"]), line["prompt"]) for line in chosen]
    sheet = contact_sheet(clips, config.out / "samples_contact_sheet.png")
    grid = clip_grid(
        [frames for frames, _ in clips[:NUM_SAMPLE_EXAMPLES]],
        columns=GRID_COLUMNS,
        scale=GRID_SCALE,
    )
    gif = write_video(config.out / "samples.gif", grid, fps=config.fps)
    mp4 = write_video(config.out / "samples.mp4", grid, fps=config.fps)
    return {"sheet": str(sheet), "gif": str(gif), "mp4": str(mp4)}


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Run every demo stage and return the paths of what it made."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(config, log)
    data_dir, tae_run = out / "data" / "shapes", out / "tae"
    latents, t2v_run, samples = out / "latents", out / "t2v", out / "samples"
    data_params = {
        key: getattr(config, key)
        for key in (
            "num_clips",
            "size",
            "num_frames",
            "fps",
            "seed",
            "val_fraction",
            "lossless_data",
        )
    }
    tae_params = {
        **data_params,
        "recipe": config.tae_recipe,
        "training_budget": config.training_budget_s,
        "budget": config.tae_time_budget_s,
        "tae_steps": config.tae_steps,
        "stats_clips": config.stats_clips,  # the latent statistics are part of this stage
    }
    t2v_params = {
        **tae_params,
        "t2v_recipe": config.t2v_recipe,
        "t2v_budget": config.t2v_time_budget_s,
        "t2v_steps": config.t2v_steps,
    }
    sample_params = {
        **t2v_params,
        "steps": config.sample_steps,
        "cfg": config.cfg_scale,
        "cfg_interval": list(config.cfg_interval),
        "eta": config.sample_eta,
    }

    def make_data():
        generate_shapes_dataset(
            data_dir,
            num_clips=config.num_clips,
            size=config.size,
            num_frames=config.num_frames,
            fps=config.fps,
            seed=config.seed,
            val_fraction=config.val_fraction,
            lossless=config.lossless_data,
        )

    def train_tae():
        tae_config = resolve_config(
            config.tae_recipe,
            train=str(data_dir / "train.jsonl"),
            val=str(data_dir / "val.jsonl"),
            size=config.size,
            overrides=[
                f"time_budget_s={config.tae_time_budget_s}",
                "fit_schedule_to_budget=true",
                *_steps_override(config.tae_steps),
            ],
        )
        # Validate once, at the end: each validation (32 whole clips, a preview
        # video, the loss plot) took 2.5-5 s of the budget, ~95 steps in all.
        tae_config = replace(tae_config, val_every=tae_config.steps)
        trainer = TAETrainer(tae_config, tae_run)
        logs = trainer.train()
        store_latent_stats(tae_run, data_dir / "train.jsonl", max_clips=config.stats_clips)
        return {"val_psnr": logs["val/psnr"], "train_seconds": trainer.train_seconds}

    def make_latents():
        precompute(
            PrecomputeConfig(
                tae=str(tae_run),
                data=str(data_dir / "train.jsonl"),
                size=config.size,
                num_frames=config.num_frames,
                fps=config.fps,
            ),
            latents,
            text_encoders=default_text_encoders(),
        )

    def train_t2v():
        t2v_config = resolve_t2v_config(
            config.t2v_recipe,
            latents=str(latents),
            overrides=[
                f"time_budget_s={config.t2v_budget_s(tae_result['train_seconds'])}",
                "fit_schedule_to_budget=true",
                f"seed={config.seed}",
                # No periodic samples: stage 7 samples every caption anyway.
                "sample_every=0",
                *_steps_override(config.t2v_steps),
            ],
        )
        logs = T2VTrainer(t2v_config, t2v_run).train()
        return {"flow_loss": logs.get("loss/flow")}

    stages.run("shapes dataset", data_dir, data_params, make_data)
    preview = stages.run("preview", None, {}, lambda: _preview(config, data_dir))
    tae_result = stages.run("TAE training + latent stats", tae_run, tae_params, train_tae)
    reconstruction = stages.run(
        "TAE reconstruction", None, {}, lambda: _reconstruct(config, tae_run, data_dir)
    )
    stages.run("precompute", latents, tae_params, make_latents)
    stages.run("transformer training", t2v_run, t2v_params, train_t2v)
    sampled = stages.run(
        "sampling 144 captions", samples, sample_params, lambda: _sample(config, t2v_run, samples)
    )
    score = stages.run("scoring", None, {}, lambda: score_samples(samples).to_dict())
    showcase = stages.run("contact sheet and videos", None, {}, lambda: _showcase(config, samples))

    outputs = {
        "shapes contact sheet": Path(preview["sheet"]),
        "shapes preview gif": Path(preview["gif"]),
        "TAE run": tae_run,
        "TAE loss curves": tae_run / "loss_curves.png",
        "TAE reconstruction": Path(reconstruction["gif"]),
        "latents": latents,
        "transformer run": t2v_run,
        "transformer loss curves": t2v_run / "loss_curves.png",
        "samples": samples,
        "samples contact sheet": Path(showcase["sheet"]),
        "samples gif": Path(showcase["gif"]),
        "samples mp4": Path(showcase["mp4"]),
    }
    summary = {
        "config": {
            k: os.fspath(v) if isinstance(v, Path) else v for k, v in asdict(config).items()
        },
        "timings_s": stages.timings,
        "total_s": sum(stages.timings.values()),
        "tae_psnr": reconstruction["psnr"],
        "seconds_per_sample": sampled["seconds_per_video"],
        "score": {
            "all_correct_rate": score["all_correct_rate"],
            "accuracy": score["accuracy"],
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log("")
    log(f"{'stage':<30}{'seconds':>10}")
    for stage, seconds in stages.timings.items():
        log(f"{stage:<30}{seconds:>10.1f}")
    log(f"{'total':<30}{summary['total_s']:>10.1f}")
    log("")
    log(f"TAE held-out PSNR: {reconstruction['psnr']:.2f} dB")
    accuracy = ", ".join(f"{k} {v:.0%}" for k, v in score["accuracy"].items())
    log(
        f"prompt adherence on 144 captions: {score['all_correct_rate']:.1%} all correct ({accuracy})"
    )
    for name, path in outputs.items():
        log(f"{name:<24} {path}")
    return outputs
