"""Training the TAE: `moviegen tae train`.

One loop, any size: AdamW with warmup + cosine, gradient clipping and
accumulation, EMA weights, video batches mixed with image batches (the paper's
1 image batch per 3 video batches), the outlier penalty switched on after a
configurable step, an optional discriminator, periodic validation (PSNR, SSIM,
latent outlier statistics, a side-by-side video), CSV/TensorBoard scalars and a
loss-curve PNG, and atomic checkpoints that resume exactly (model, EMA,
optimizers, scheduler, data position, RNG states).

Training clips are cut into random ``crop_frames x crop_size x crop_size``
windows: the TAE is convolutional (and its encoder works on independent 32-frame
chunks anyway), and small windows make many more steps fit into a CPU budget.
Validation always runs on whole clips.

Under ``torchrun --nproc_per_node N -m moviegen tae train ...`` every rank
holds the whole (small) TAE and trains on its share of every global batch
(``batch_size`` and ``image_batch_size`` are global); gradients are averaged
over the ranks after backward (what DDP does), so the ranks stay identical.
Crops are keyed by the clip's position in the global batch; the posterior noise,
drawn inside the model for a rank's whole batch, is keyed by the rank, so with
``sample_posterior`` the noise (only) depends on the number of ranks. Rank 0
prints, logs, validates and writes the previews; checkpoints are DCP plus a
consolidated copy that ``load_tae`` reads (:mod:`moviegen.train.resumable`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from moviegen.config import apply_overrides, config_to_dict, save_config
from moviegen.data.buckets import BucketSpec
from moviegen.data.dataset import SkipCounter, VideoTextDataset, build_loader
from moviegen.data.transforms import to_uint8_frames
from moviegen.data.video_io import write_video
from moviegen.eval.metrics import latent_outlier_stats, psnr, ssim
from moviegen.eval.visualize import clip_grid
from moviegen.tae.checkpoint import TAE_KIND
from moviegen.tae.losses import TAELoss, TAELossConfig
from moviegen.tae.model import COMPRESSION, TAE, TAEConfig, tae_recipe
from moviegen.train.allocator import keep_freed_memory
from moviegen.train.checkpoint import CheckpointManager
from moviegen.train.distributed_run import (
    all_gather_sizes,
    all_reduce_sum,
    any_rank,
    average_gradients,
    barrier,
    run_env,
)
from moviegen.train.ema import EMA
from moviegen.train.logging import ScalarLogger, plot_curves
from moviegen.train.resumable import ResumableTraining, keyed_generator, pick_device
from moviegen.train.schedule import build_scheduler

__all__ = ["TAEDataConfig", "TAETrainConfig", "TAETrainer", "tae_train_recipe"]

# Clips shown side by side in validation videos, and their playback rate when
# the data config keeps each file's own rate.
NUM_PREVIEW_CLIPS = 4
PREVIEW_FPS = 8
# Steps of the ``cpu`` recipe: what 2 CPU cores train in about 4.5-5 minutes
# (the demo's TAE budget; the demo also fits the schedule to it, see
# DemoConfig). After 1600 steps the shapes scorer reads 99% of the held-out
# reconstructions right (78% after 820; docs/BENCHMARKS.md).
CPU_RECIPE_STEPS = 1600
# Of these, the last ones train the decoder alone (see tae_train_recipe).
CPU_DECODER_ONLY_STEPS = 300
# Streams of keyed_generator((seed, stream, micro_batch, sample or rank)).
_CROP_STREAM = 1
_POSTERIOR_STREAM = 2


@dataclass(frozen=True, kw_only=True)
class TAEDataConfig:
    """Where clips come from and how they are cut."""

    train: str = ""  # training manifest (JSON Lines); required
    val: str | None = None  # validation manifest; None: no validation
    size: int = 64  # clips are resized (shorter side) and centre-cropped to size x size
    num_frames: int = 16  # frames read per clip
    fps: float | None = None  # sampling rate; None keeps each file's rate
    crop_size: int | None = 32  # random spatial crop for training; None: whole frames
    crop_frames: int | None = 8  # random temporal window for training; None: whole clips
    # Content-aware crops: draw this many random windows per clip and train on
    # the one whose pixels vary most. 1 is a plain random crop. On sparse
    # content (a small object on black) most plain crops are empty background
    # that teaches nothing; on natural video every crop has content and the
    # choice hardly matters.
    crop_candidates: int = 1
    batch_size: int = 8  # video clips per (global) batch, split over the ranks
    image_batch_size: int = 32  # frames per (global) image batch (images are cheap)
    image_fraction: float = 0.25  # share of image batches: 1 per 3 video batches
    num_workers: int = 0  # DataLoader workers (0 is fastest on 2 cores)
    # Decoded clips kept in memory (MiB, per process); 0: decode every batch.
    cache_mib: float = 0.0
    val_clips: int = 32  # validation clips (the first ones of the val manifest)

    def __post_init__(self) -> None:
        if self.crop_candidates < 1:
            raise ValueError(f"crop_candidates must be >= 1, got {self.crop_candidates}")


@dataclass(frozen=True, kw_only=True)
class TAETrainConfig:
    """Everything a TAE run needs; saved with every checkpoint."""

    recipe: str = "cpu"  # the TAE recipe the model config came from
    model: TAEConfig = field(default_factory=TAEConfig)
    loss: TAELossConfig = field(default_factory=TAELossConfig)
    data: TAEDataConfig = field(default_factory=TAEDataConfig)
    steps: int = 2000  # optimizer steps
    time_budget_s: float | None = None  # stop (and checkpoint) after this much training time
    # With a time budget: move the LR schedule ahead when the budget would stop
    # the run before `steps`, so the schedule completes inside the budget.
    fit_schedule_to_budget: bool = False
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    disc_lr: float = 1e-4
    ema_decay: float = 0.999  # 0 disables EMA
    sample_posterior: bool = True  # train on posterior samples (VAE) rather than means
    # The last this-many steps of the schedule train the decoder alone: the
    # encoder, and so the latent space, stays fixed while the decoder converges
    # on it (as Stable Diffusion's VAE decoder was fine-tuned). With a fitted
    # schedule the phase follows the schedule's position, not the step count.
    decoder_only_steps: int = 0
    log_every: int = 10
    val_every: int = 250
    checkpoint_every: int = 250
    keep_last: int = 2
    # Distributed runs: write DCP checkpoints in a background thread.
    async_checkpoint: bool = False
    # Distributed runs: also write the consolidated single-process copy of the weights
    # (what load_tae reads) at every checkpoint, not only at the end.
    export_every_checkpoint: bool = True
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", ...

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.decoder_only_steps <= self.steps:
            raise ValueError(
                f"decoder_only_steps must be in [0, steps={self.steps}], "
                f"got {self.decoder_only_steps}"
            )


def tae_train_recipe(name: str) -> TAETrainConfig:
    """Named training recipes: ``debug`` (tests), ``cpu`` (the demo), ``paper``."""
    model = tae_recipe(name)
    if name == "debug":
        return TAETrainConfig(
            recipe=name,
            model=model,
            lr=2e-3,
            loss=TAELossConfig(l1_weight=0.1, l2_weight=1.0),
            steps=20,
            warmup_steps=2,
            val_every=10,
            checkpoint_every=10,
            log_every=5,
            data=TAEDataConfig(size=32, num_frames=8, crop_size=16, crop_frames=8, batch_size=2),
        )
    if name == "paper":
        return TAETrainConfig(
            recipe=name,
            model=model,
            steps=60_000,
            lr=1e-4,
            warmup_steps=1000,
            val_every=2000,
            checkpoint_every=2000,
            # 50K steps without OPL, then 10K with it (MOVIEGEN.md section 1).
            loss=TAELossConfig(opl_start_step=50_000),
            data=TAEDataConfig(
                size=256, num_frames=32, crop_size=256, crop_frames=32, batch_size=1
            ),
        )
    # cpu: the demo TAE. MSE-led reconstruction for sparse content. Per-pixel
    # norms and residual shortcuts (recipe "cpu" of TAE_RECIPES) make random
    # crops train like whole frames, so it trains on 32 px x 16 frame crops
    # (two latent frames, so the decoder learns the seam between them), 4x
    # cheaper than whole 64 px frames, picking crops that show the object.
    # Measured on held-out shapes clips after 600 steps (docs/BENCHMARKS.md):
    # 28.4 dB against 19.6 dB for the GroupNorm TAE on whole frames.
    return TAETrainConfig(
        recipe=name,
        model=model,
        lr=2e-3,
        steps=CPU_RECIPE_STEPS,
        # No EMA: in a run this short the average lags the annealed weights
        # (measured: 29.92 dB with the EMA, 30.12 dB without, same run).
        ema_decay=0.0,
        # The decoder converges on a fixed latent space for the last steps.
        # The transformer's latents of small objects decode rounder on a decoder
        # that chased a moving encoder: 300 decoder-only steps after training
        # took the demo's samples (a fixed transformer, 3 x 144) from 89.4% to
        # 94.7% all correct. Full demo runs with it scored 79.9-95.1%: the
        # transformer's training still decides the spread (docs/BENCHMARKS.md).
        decoder_only_steps=CPU_DECODER_ONLY_STEPS,
        # The gradient difference term sharpens small objects' edges: with it
        # the shapes scorer reads 78% of reconstructed held-out clips right
        # (70% without; every miss a small shape's kind), 31.1 vs 30.1 dB (102 clips).
        loss=TAELossConfig(l1_weight=0.1, l2_weight=1.0, gradient_weight=0.5),
        # The decoded training clips stay in memory (181 MiB for the demo's
        # 922 shapes clips): decoding was ~12% of a step.
        data=TAEDataConfig(
            crop_size=32,
            crop_frames=16,
            crop_candidates=4,
            batch_size=4,
            image_batch_size=16,
            cache_mib=1024,
        ),
    )


def content_crop(
    clip: torch.Tensor,
    crop: tuple[int, int, int],
    num_candidates: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """A random ``crop = (frames, height, width)`` window of ``clip (C, T, H, W)``:
    of ``num_candidates`` uniformly drawn windows, the one whose pixels vary most
    (the first of equals, so one candidate is a plain random crop)."""
    crop_t, crop_h, crop_w = crop
    _, frames, height, width = clip.shape
    candidates = []
    for _ in range(num_candidates):
        t0, y0, x0 = (
            int(torch.randint(0, limit + 1, (1,), generator=generator))
            for limit in (frames - crop_t, height - crop_h, width - crop_w)
        )
        candidates.append(clip[:, t0 : t0 + crop_t, y0 : y0 + crop_h, x0 : x0 + crop_w])
    return max(candidates, key=lambda window: float(window.var()))


class TAETrainer(ResumableTraining):
    """Builds everything from a config and runs (or resumes) training in ``run_dir``."""

    def __init__(self, config: TAETrainConfig, run_dir: str | Path, *, progress: bool = True):
        if not config.data.train:
            raise ValueError("data.train (the training manifest) is required")
        self.config = config
        self.run_dir = Path(run_dir)
        self.env = run_env()
        self.progress = progress and self.env.is_main
        self.device = pick_device(config.device)
        if self.env.is_distributed and self.device.type == "cuda":
            # One GPU per rank (distributed_run made it the current device).
            self.device = torch.device("cuda", torch.cuda.current_device())
        # Zero-initialised layers make tiny (denormal) floats during training,
        # and CPUs handle those up to 100x slower; flushing them to zero is harmless.
        torch.set_flush_denormal(True)
        keep_freed_memory()  # no page faults for the activations of every step
        torch.manual_seed(config.seed)
        self.model = TAE(config.model).to(self.device)
        self.loss = TAELoss(config.loss).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            config.schedule,
            warmup_steps=config.warmup_steps,
            total_steps=config.steps,
            min_lr_ratio=config.min_lr_ratio,
        )
        self.disc_optimizer = None
        if self.loss.discriminator is not None:
            self.disc_optimizer = torch.optim.AdamW(
                self.loss.discriminator.parameters(), lr=config.disc_lr, betas=(0.5, 0.9)
            )
        self.ema = (
            EMA(self.model, decay=config.ema_decay, warmup=True) if config.ema_decay else None
        )

        data = config.data
        world_size = self.env.world_size
        for name in ("batch_size", "image_batch_size"):
            if getattr(data, name) % world_size:
                raise ValueError(
                    f"data.{name} {getattr(data, name)} (per global batch) is not divisible "
                    f"by the {world_size} ranks"
                )
        self.dataset = VideoTextDataset(
            data.train,
            num_frames=data.num_frames,
            size=(data.size, data.size),
            fps=data.fps,
            seed=config.seed,
            cache_mib=data.cache_mib,
        )
        spec = BucketSpec(
            sizes=((data.size, data.size),),
            frame_counts=(data.num_frames,),
            default_batch_size=data.batch_size // world_size,
            image_batch_size=data.image_batch_size // world_size,
        )
        self.loader, self.sampler = build_loader(
            self.dataset,
            spec,
            seed=config.seed,
            rank=self.env.rank,
            world_size=world_size,
            num_workers=data.num_workers,
            image_fraction=data.image_fraction or None,
            video_frames_as_images=bool(data.image_fraction),
        )
        # Only rank 0 validates (every rank holds the same weights).
        self.val_videos = self._load_val_clips() if data.val and self.env.is_main else None
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=config.keep_last)
        self.dcp = self._make_dcp_checkpointer() if self.env.is_distributed else None
        self.skips = SkipCounter()
        self.step = 0
        self.epoch = 0
        self.consumed = 0  # batches of the current epoch already used
        self.train_seconds = 0.0

    # ------------------------------------------------------------------ data

    def _load_val_clips(self) -> torch.Tensor:
        data = self.config.data
        dataset = VideoTextDataset(
            data.val,
            num_frames=data.num_frames,
            size=(data.size, data.size),
            fps=data.fps,
            random_start=False,
        )
        clips = []
        for index in range(min(data.val_clips, len(dataset))):
            sample = dataset[index]
            if isinstance(sample, dict):
                clips.append(sample["video"])
            else:
                self.skips.add(sample)
        if not clips:
            raise ValueError(f"no readable validation clips in {data.val}")
        return torch.stack(clips)  # (N, 3, T, H, W)

    def _batches(self):
        """Endless batches; the trainer owns the epoch counter so that sampler
        and dataset (random window starts) always agree, also after resume."""
        resumed_mid_epoch = self.consumed > 0
        while True:
            if not resumed_mid_epoch:
                self.sampler.set_epoch(self.epoch)
            resumed_mid_epoch = False
            self.dataset.set_epoch(self.epoch)
            for batch in self.loader:
                self.consumed += 1
                self.skips.update(batch["skipped"])
                if batch["video"] is not None:
                    yield batch["video"]
            self.epoch += 1
            self.consumed = 0

    def _random_crop(self, video: torch.Tensor, micro_batch: int, offset: int) -> torch.Tensor:
        """Per-sample random ``crop_frames x crop_size x crop_size`` windows, each drawn
        from a stream keyed by the clip's position in the global batch."""
        data = self.config.data
        _, _, frames, height, width = video.shape
        crop_t = min(data.crop_frames or frames, frames)
        crop_h = min(data.crop_size or height, height)
        crop_w = min(data.crop_size or width, width)
        crops = []
        for position, clip in enumerate(video, start=offset):
            generator = keyed_generator(self.config.seed, _CROP_STREAM, micro_batch, position)
            crops.append(
                content_crop(clip, (crop_t, crop_h, crop_w), data.crop_candidates, generator)
            )
        return torch.stack(crops)

    def _decoder_only_pass(
        self, video: torch.Tensor, micro_batch: int, offset: int, posterior: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder-only pass: ``(target crops, reconstruction, mean, logvar)``.

        The encoder sees whole clips, without autograd, so the decoder trains on
        the latents it decodes at inference (those of whole frames, not of
        crops). It decodes a ``crop_size`` window of them on the latent grid:
        the window whose pixels vary most, ties drawn at random from a stream
        keyed by the clip's position in the global batch. On sparse content
        that window holds the whole object, which is what the steps are for:
        300 decoder steps on windows centred on the object took a fixed demo
        transformer's samples from 91.9% to 94.4% all correct, on random
        windows to 91.0% (docs/BENCHMARKS.md). Clips are not cut in time.
        """
        model, data = self.model, self.config.data
        with torch.no_grad():
            mean, logvar = model.split_moments(model.encode_moments(video))
            latents = mean
            if self.config.sample_posterior:
                noise = torch.randn(mean.shape, generator=posterior, dtype=mean.dtype)
                latents = mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
        height, width = video.shape[-2:]
        # Window and positions in latent cells; windows lie inside the (unpadded) frame.
        cell = COMPRESSION
        window_h = max(1, min(data.crop_size or height, height) // cell)
        window_w = max(1, min(data.crop_size or width, width) // cell)
        positions = [
            (row, col)
            for row in range(max(1, height // cell - window_h + 1))
            for col in range(max(1, width // cell - window_w + 1))
        ]
        targets, windows = [], []
        for position, (clip, clip_latents) in enumerate(
            zip(video, latents, strict=True), start=offset
        ):
            generator = keyed_generator(self.config.seed, _CROP_STREAM, micro_batch, position)
            order = torch.randperm(len(positions), generator=generator).tolist()
            crops = [
                clip[
                    ..., row * cell : (row + window_h) * cell, col * cell : (col + window_w) * cell
                ]
                for row, col in (positions[index] for index in order)
            ]
            best = max(range(len(crops)), key=lambda index: float(crops[index].var()))
            row, col = positions[order[best]]
            targets.append(crops[best])
            windows.append(clip_latents[..., row : row + window_h, col : col + window_w])
        target = torch.stack(targets)
        reconstruction = model.decode_latents(torch.stack(windows), num_frames=video.shape[2])
        return target, reconstruction[..., : target.shape[-2], : target.shape[-1]], mean, logvar

    # ------------------------------------------------------------------ state

    def _train_state(self) -> dict:
        state = super()._train_state()
        if self.disc_optimizer is not None:
            state["discriminator"] = self.loss.discriminator.state_dict()
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        return state

    def _dcp_state(self) -> dict:
        state = super()._dcp_state()
        if self.disc_optimizer is not None:
            from moviegen.distributed.checkpoint import ModelState, OptimizerState

            state["discriminator"] = ModelState(self.loss.discriminator)
            state["disc_optimizer"] = OptimizerState(self.loss.discriminator, self.disc_optimizer)
        return state

    def _metadata(self) -> dict:
        return {"kind": TAE_KIND, "config": config_to_dict(self.config)}

    def _check_saved_config(self, saved: dict, path: Path) -> None:
        if saved.get("model") != config_to_dict(self.config)["model"]:
            raise ValueError(
                f"{path} was trained with another TAE architecture; "
                "use a new --out folder or the same recipe"
            )

    def resume(self) -> bool:
        """Load the latest complete checkpoint of ``run_dir`` if there is one."""
        if self.dcp is not None:
            return self._resume_distributed(self._check_saved_config)
        latest = self.checkpoints.latest()
        if latest is None:
            return False
        checkpoint = CheckpointManager.load(latest, map_location=self.device)
        self._check_saved_config(checkpoint.metadata.get("config", {}), latest)
        self._restore_state(checkpoint)
        state = checkpoint.train_state
        if self.disc_optimizer is not None and "discriminator" in state:
            self.loss.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        return True

    # ------------------------------------------------------------------ steps

    def _train_step(self, batches) -> dict[str, float]:
        """One optimizer step; the logs are means over the global batch (every rank)."""
        config = self.config
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        weighted: dict[str, float] = {}
        last_layer = self.model.decoder.last_layer_weight
        decoder_only = self.decoder_only
        for micro in range(config.grad_accum):
            micro_batch = self.step * config.grad_accum + micro
            video = next(batches)
            sizes = all_gather_sizes(video.shape[0], self.device)
            offset, global_size = sum(sizes[: self.env.rank]), sum(sizes)
            # This rank's share of the global batch: the averaged gradient is then
            # that of the global batch's mean, also when the ranks' batches differ.
            share = video.shape[0] / global_size
            scale = share * self.env.world_size
            posterior = keyed_generator(config.seed, _POSTERIOR_STREAM, micro_batch, self.env.rank)
            if decoder_only:
                video, reconstruction, mean, logvar = self._decoder_only_pass(
                    video.to(self.device), micro_batch, offset, posterior
                )
            else:
                video = self._random_crop(video, micro_batch, offset).to(self.device)
                reconstruction, mean, logvar = self.model(
                    video, sample=config.sample_posterior, generator=posterior
                )
            loss, micro_logs = self.loss.generator_loss(
                video,
                reconstruction,
                mean,
                logvar,
                mean,
                step=self.step,
                last_layer_weight=last_layer if self.loss.discriminator is not None else None,
            )
            (loss * scale / config.grad_accum).backward()
            disc = self.loss.discriminator_loss(video, reconstruction, step=self.step)
            if disc is not None:
                disc_loss, disc_logs = disc
                self.disc_optimizer.zero_grad(set_to_none=True)
                (disc_loss * scale).backward()
                average_gradients(self.loss.discriminator.parameters())
                self.disc_optimizer.step()
                micro_logs = {**micro_logs, **disc_logs}
            for key, value in micro_logs.items():
                weighted[key] = weighted.get(key, 0.0) + value * share / config.grad_accum
        average_gradients(self.model.parameters())
        # Every rank has the same keys (they depend on the step only).
        names = sorted(weighted)
        totals = all_reduce_sum(
            torch.tensor([weighted[name] for name in names], dtype=torch.float64)
        )
        logs = dict(zip(names, totals.tolist(), strict=True))
        if config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            logs["train/grad_norm"] = float(norm)
        self.optimizer.step()
        self._step_scheduler()
        if self.ema is not None:
            self.ema.update(self.model)
        logs["train/lr"] = self.scheduler.get_last_lr()[0]
        logs["train/decoder_only"] = float(decoder_only)
        return logs

    @property
    def decoder_only(self) -> bool:
        """Whether the next step trains the decoder alone: the schedule's
        position (``scheduler.last_epoch``, ahead of the step count when fitted
        to a time budget) has reached the last ``decoder_only_steps``."""
        config = self.config
        return (
            config.decoder_only_steps > 0
            and self.scheduler.last_epoch >= config.steps - config.decoder_only_steps
        )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """PSNR / SSIM / latent outliers on whole validation clips (EMA weights),
        and a side-by-side video ``samples/step_XXXXXXXX.mp4``."""
        if self.val_videos is None:
            return {}
        context = (
            self.ema.swapped_into(self.model) if self.ema is not None else contextlib.nullcontext()
        )
        psnrs, ssims, means, previews = [], [], [], []
        with context:
            self.model.eval()
            for chunk in self.val_videos.split(self.config.data.batch_size):
                video = chunk.to(self.device)
                reconstruction, mean, _ = self.model(video, sample=False)
                reconstruction = reconstruction.clamp(-1, 1)
                psnrs.append(psnr(reconstruction, video).cpu())
                ssims.append(ssim(reconstruction, video).cpu())
                means.append(mean.cpu())
                if len(previews) < NUM_PREVIEW_CLIPS:
                    previews.extend(zip(video.cpu(), reconstruction.cpu(), strict=True))
        stats = latent_outlier_stats(torch.cat(means))
        logs = {
            "val/psnr": float(torch.cat(psnrs).mean()),
            "val/ssim": float(torch.cat(ssims).mean()),
            "val/max_zscore": stats["max_zscore"],
            "val/frac_above_3": stats["frac_above_3"],
        }
        pairs = []
        for original, reconstruction in previews[:NUM_PREVIEW_CLIPS]:
            pairs += [to_uint8_frames(original), to_uint8_frames(reconstruction)]
        grid = clip_grid(pairs, columns=2, scale=max(1, 128 // self.config.data.size))
        write_video(
            self.run_dir / "samples" / f"step_{self.step:08d}.mp4",
            grid,
            fps=self.config.data.fps or PREVIEW_FPS,
        )
        return logs

    # ------------------------------------------------------------------ loop

    def train(self, *, stop_at: int | None = None) -> dict[str, float]:
        """Run until ``steps`` (or the time budget, or ``stop_at``, which stops
        early as an interruption would, after a checkpoint); returns the last
        validation logs (rank 0; other ranks return ``{}``). Distributed: every
        rank calls it."""
        config = self.config
        main = self.env.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        resumed = self.resume()
        if main:
            save_config(config, self.run_dir / "config.json")
            if self.loss.perceptual is None:
                tqdm.write("perceptual loss: off (no perceptual_vgg_path given)")
        batches = self._batches()
        logger = ScalarLogger(self.run_dir) if main else None
        bar = tqdm(
            total=config.steps,
            initial=self.step,
            desc="tae",
            unit="step",
            disable=not self.progress,
        )
        if resumed and main:
            tqdm.write(f"resumed from step {self.step} in {self.run_dir}")
        val_logs: dict[str, float] = {}
        start_seconds = self.train_seconds
        started = time.perf_counter()
        try:
            while self.step < config.steps:
                logs = self._train_step(batches)
                self.step += 1
                self.train_seconds = start_seconds + time.perf_counter() - started
                bar.update(1)
                if self.step % config.log_every == 0:
                    if logger is not None:
                        logger.log(self.step, {**logs, "train/seconds": self.train_seconds})
                    bar.set_postfix(loss=f"{logs['loss/total']:.4f}")
                out_of_time = (
                    config.time_budget_s is not None and self.train_seconds >= config.time_budget_s
                )
                if config.time_budget_s is not None:
                    # Each rank's clock differs a little: stop together.
                    out_of_time = any_rank(out_of_time, self.device)
                interrupted = stop_at is not None and self.step >= stop_at
                finished = self.step == config.steps or out_of_time or interrupted
                if main and (self.step % config.val_every == 0 or finished):
                    val_logs = self.validate()
                    if val_logs:
                        logger.log(self.step, val_logs)
                        bar.set_postfix(
                            loss=f"{logs['loss/total']:.4f}", psnr=f"{val_logs['val/psnr']:.2f}"
                        )
                    plot_curves(logger.csv_path, self.run_dir / "loss_curves.png")
                if self.step % config.checkpoint_every == 0 or finished:
                    self.save(final=finished)
                if interrupted:
                    break
                if out_of_time:
                    if main:
                        tqdm.write(
                            f"time budget of {config.time_budget_s:.0f} s reached at step "
                            f"{self.step}"
                        )
                    break
            if self.dcp is not None:
                self._finish_distributed(self._metadata())
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        if self.skips.total and main:
            tqdm.write(self.skips.summary())
        return val_logs


def resolve_config(
    recipe: str, *, overrides: list[str] | None = None, **data_fields
) -> TAETrainConfig:
    """A recipe with data fields filled in and ``--set key=value`` overrides applied."""
    config = tae_train_recipe(recipe)
    fields = {key: value for key, value in data_fields.items() if value is not None}
    if fields:
        config = replace(config, data=replace(config.data, **fields))
    return apply_overrides(config, overrides or [])
