"""Training the text-to-video transformer: `moviegen train`.

Reads a precompute folder (TAE latents and frozen text-encoder features, see
:mod:`moviegen.data.precompute`), so neither the TAE nor the text encoders run
during training. One loop, any size: flow matching with logit-normal t (the
path and targets come from :mod:`moviegen.flow`), caption dropout on the
features for classifier-free guidance, AdamW with warmup + cosine or constant
learning rate, gradient clipping and accumulation, EMA weights, bucketed batches
(one latent shape per batch), loss per t-bucket, tokens/s and model FLOPs
utilisation, periodic sample videos, CSV/TensorBoard scalars with a loss-curve
PNG, and atomic checkpoints that resume exactly (model, EMA, optimizer,
scheduler, sampler position, RNG states).

The same code runs as one process or as every process of a ``torchrun`` job
(``torchrun --nproc_per_node N -m moviegen train ...``; see docs/DISTRIBUTED.md):
the transformer is parallelised by ``parallel`` (FSDP2, optionally HSDP,
context parallel, activation checkpointing, compile); ``batch_size`` stays the
*global* micro-batch, split over the data-parallel ranks; the randomness of a
step is keyed by the sample's position in the global batch
(:func:`~moviegen.train.resumable.keyed_generator`), so N ranks train like one
process with the same global batch; rank 0 alone prints, logs, plots and
writes samples; checkpoints are sharded DCP checkpoints plus a consolidated
copy that sampling reads (:mod:`moviegen.train.resumable`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from moviegen.config import apply_overrides, config_to_dict, save_config
from moviegen.data.buckets import BucketBatchSampler, BucketSpec
from moviegen.data.precompute import (
    LatentDataset,
    collate_latents,
    load_null_features,
    pad_text_features,
    repeat_text_features,
)
from moviegen.data.transforms import strip_fps_prefix, to_uint8_frames
from moviegen.data.video_io import write_video
from moviegen.distributed.mesh import ParallelConfig
from moviegen.eval.visualize import clip_grid
from moviegen.flow import FlowPath, TimestepSampler, build_timestep_sampler
from moviegen.flow.path import SIGMA_MIN
from moviegen.pipeline.sample import T2V_KIND, generate_latents
from moviegen.tae.checkpoint import load_tae
from moviegen.text import CAPTION_DROPOUT, TextFeatures, caption_keep_mask, drop_features
from moviegen.train.allocator import keep_freed_memory
from moviegen.train.checkpoint import CheckpointManager
from moviegen.train.distributed_run import (
    all_gather_sizes,
    all_reduce_sum,
    any_rank,
    barrier,
    run_env,
)
from moviegen.train.ema import EMA
from moviegen.train.logging import ScalarLogger, plot_curves
from moviegen.train.resumable import (
    ResumableTraining,
    StateDictNames,
    keyed_generator,
    pick_device,
)
from moviegen.train.schedule import build_scheduler
from moviegen.train.throughput import measure_matmul_flops, model_flops_utilisation
from moviegen.transformer import (
    TransformerConfig,
    num_video_tokens,
    train_step_flops,
    transformer_recipe,
)
from moviegen.transformer.conditioned import TextToVideoModel

__all__ = ["T2VTrainConfig", "T2VTrainer", "resolve_t2v_config", "t2v_train_recipe"]

# Columns of the periodic sample grid, the width in pixels its tiles are
# upscaled to, and the playback rate when the latents record no fps.
SAMPLE_GRID_COLUMNS = 4
SAMPLE_TILE_PIXELS = 128
SAMPLE_FPS = 8
# Steps of the ``tiny`` recipe: about 7.5 minutes on 2 CPU cores (the demo's
# transformer budget; the demo fits the schedule to the budget, so a slower
# machine ends the cosine earlier). The shapes captions need this length and
# more: 85-95% all correct after 2400 steps, 89-90% after ~2250, 26-41% after
# 680-760 (docs/BENCHMARKS.md).
TINY_RECIPE_STEPS = 2700
# Streams of keyed_generator((seed, stream, micro_batch[, sample])): one per
# kind of randomness, so that changing one never shifts another.
_TIMESTEP_STREAM = 1
_CAPTION_STREAM = 2
_NOISE_STREAM = 3


@dataclass(frozen=True)
class _Draw:
    """Where this rank's samples sit in the global micro-batch being trained."""

    micro_batch: int  # micro-batches trained before this one (step * grad_accum + k)
    offset: int  # position of this rank's first sample in the global micro-batch
    global_size: int  # samples in the global micro-batch (all data-parallel ranks)


@dataclass(frozen=True, kw_only=True)
class T2VTrainConfig:
    """Everything a transformer run needs; saved with every checkpoint."""

    recipe: str = "tiny"  # the transformer recipe the model config came from
    model: TransformerConfig = field(default_factory=lambda: transformer_recipe("tiny"))
    latents: str = ""  # precompute folder (`moviegen precompute`); required
    steps: int = 5000  # optimizer steps
    time_budget_s: float | None = None  # stop (and checkpoint) after this much training time
    # With a time budget: move the LR schedule ahead when the budget would stop
    # the run before `steps`, so the schedule completes inside the budget.
    fit_schedule_to_budget: bool = False
    batch_size: int = 32  # global samples per micro-batch (every bucket), split over data ranks
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.999  # 0 disables EMA
    caption_dropout: float = CAPTION_DROPOUT  # share of captions replaced by the empty prompt
    timestep_sampler: Literal["logit_normal", "uniform"] = "logit_normal"
    # Logit-normal location and spread: t = sigmoid(mean + std * n); a positive
    # mean trains more near the data end (t = 1), where fine detail is decided.
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    sigma_min: float = SIGMA_MIN
    num_t_buckets: int = 5  # the loss is also logged per t-bucket [k/n, (k+1)/n)
    log_every: int = 10
    sample_every: int = 500  # sample videos into samples/ (0: never)
    num_sample_prompts: int = 8  # distinct training captions sampled
    sample_steps: int = 50
    sample_cfg: float = 7.5
    checkpoint_every: int = 500
    keep_last: int = 2
    # Distributed runs: write DCP checkpoints in a background thread.
    async_checkpoint: bool = False
    # Distributed runs: also write the consolidated single-process copy of the weights
    # (what sampling loads) at every checkpoint, not only at the end; rank 0 then
    # reads the full weights into CPU memory at each save.
    export_every_checkpoint: bool = True
    # How the transformer is parallelised under torchrun (ignored in one process).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    peak_flops: float | None = None  # for MFU; None: measure the fp32 matmul FLOP/s here
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", ...

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "checkpoint_every", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        self.build_timestep_sampler()  # checks the sampler's name and parameters

    def build_timestep_sampler(self) -> TimestepSampler:
        """The training-time sampler of t this config describes."""
        if self.timestep_sampler == "logit_normal":
            return build_timestep_sampler(
                self.timestep_sampler, mean=self.timestep_mean, std=self.timestep_std
            )
        return build_timestep_sampler(self.timestep_sampler)


def t2v_train_recipe(name: str) -> T2VTrainConfig:
    """Training recipes named after the transformer recipes; ``debug`` is for tests
    and ``tiny`` for the CPU demo; larger ones use the paper's learning rate."""
    model = transformer_recipe(name)
    if name == "debug":
        return T2VTrainConfig(
            recipe=name,
            model=model,
            steps=20,
            batch_size=4,
            lr=1e-3,
            warmup_steps=2,
            log_every=5,
            sample_every=10,
            num_sample_prompts=2,
            sample_steps=4,
            checkpoint_every=10,
        )
    if name == "tiny":
        # The CPU demo: TINY_RECIPE_STEPS fill its transformer budget on 2
        # cores, so the cosine schedule ends inside it. In a run this short
        # more, smaller steps at a higher rate learn more (measured on the demo
        # latents, 1 thread each, docs/BENCHMARKS.md): batch 64 for 390 steps
        # at lr 1e-3 reached flow loss 0.269, batch 32 for 700 steps at 2e-3 0.220.
        # Times drawn nearer the noise end (logit-normal location -0.5, median
        # t = 0.38) decide layout, motion and kind earlier: 55% of the shapes
        # captions all correct after 680 steps, against 47% at 0 and 19% at +0.5.
        return T2VTrainConfig(
            recipe=name,
            model=model,
            lr=2e-3,
            batch_size=32,
            steps=TINY_RECIPE_STEPS,
            warmup_steps=50,
            timestep_mean=-0.5,
            # No EMA: the cosine's annealed weights already average, and a 0.999
            # average lags them. On three trained demo models (two sampling
            # seeds each where measured) the raw weights scored higher every
            # time: 95.1/91.7% vs 93.8/91.0%, 89.6/86.8% vs 87.5/84.7%, 92.4%
            # vs 91.7% all correct (docs/BENCHMARKS.md).
            ema_decay=0.0,
        )
    # Movie Gen: 1e-4 for text-to-image, 6e-5 for joint image/video training.
    return T2VTrainConfig(recipe=name, model=model, lr=6e-5, batch_size=1, warmup_steps=1000)


def resolve_t2v_config(
    recipe: str, *, latents: str | None = None, overrides: list[str] | None = None
) -> T2VTrainConfig:
    """A recipe with the latents folder filled in and ``--set key=value`` overrides."""
    config = t2v_train_recipe(recipe)
    if latents is not None:
        config = apply_overrides(config, [f"latents={latents}"])
    return apply_overrides(config, overrides or [])


def _to_device(features: TextFeatures, device: torch.device) -> TextFeatures:
    return {name: (h.to(device), m.to(device)) for name, (h, m) in features.items()}


class T2VTrainer(ResumableTraining):
    """Builds everything from a config and runs (or resumes) training in ``run_dir``.

    Under ``torchrun`` with several processes every rank constructs the trainer
    (inside :func:`~moviegen.train.distributed_run.distributed_run`) and calls
    :meth:`train`; the model is then sharded over the ranks.
    """

    def __init__(self, config: T2VTrainConfig, run_dir: str | Path, *, progress: bool = True):
        if not config.latents:
            raise ValueError("latents (a `moviegen precompute` folder) is required")
        self.config = config
        self.run_dir = Path(run_dir)
        self.env = run_env()
        self.progress = progress and self.env.is_main
        self.device = pick_device(config.device)
        if self.env.is_distributed and self.device.type == "cuda":
            # One GPU per rank (distributed_run made it the current device).
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.set_flush_denormal(True)
        keep_freed_memory()  # no page faults for the activations of every step
        torch.manual_seed(config.seed)

        self.dataset = LatentDataset(config.latents)
        meta = self.dataset.meta
        self.precompute_meta = meta
        shapes = sorted(set(self.dataset.bucket_keys()))
        latent_channels = meta["tae_config"]["latent_channels"]
        if latent_channels != config.model.latent_channels:
            raise ValueError(
                f"the latents have {latent_channels} channels, the model expects "
                f"{config.model.latent_channels}"
            )
        factory = partial(TextToVideoModel, config.model, meta["text_dims"])
        if self.env.is_distributed:
            from moviegen.distributed import (
                build_mesh,
                build_parallel_model,
                data_parallel_rank,
                data_parallel_size,
            )

            self.mesh = build_mesh(config.parallel, self.env.world_size, self.device.type)
            # Built on the meta device, sharded, then initialised exactly as the
            # single-process branch below initialises the whole model.
            self.model = build_parallel_model(
                factory, self.mesh, config.parallel, self.device, seed=config.seed
            )
            self.dp_rank = data_parallel_rank(self.mesh)
            self.dp_size = data_parallel_size(self.mesh)
        else:
            self.mesh = None
            self.model = factory()
            torch.manual_seed(config.seed)
            self.model.init_weights()
            self.model.to(self.device)
            self.dp_rank, self.dp_size = 0, 1
        # Ranks per data-parallel rank (the context-parallel group reads the same samples).
        self.cp_size = self.env.world_size // self.dp_size
        if config.batch_size % self.dp_size:
            raise ValueError(
                f"batch_size {config.batch_size} (the global micro-batch) is not divisible by "
                f"the {self.dp_size} data-parallel ranks"
            )
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
        # The EMA sees the weights under their state-dict names, so that its
        # copy loads into a plain model even when blocks are AC-wrapped.
        self.ema_view = StateDictNames(self.model)
        self.ema = (
            EMA(self.ema_view, decay=config.ema_decay, warmup=True) if config.ema_decay else None
        )
        self.path = FlowPath(config.sigma_min)
        self.t_sampler = config.build_timestep_sampler()
        self.null_text = load_null_features(config.latents)

        spec = BucketSpec(
            sizes=tuple(sorted({(h, w) for _, h, w in shapes})),
            frame_counts=tuple(sorted({t for t, _, _ in shapes})),
            default_batch_size=config.batch_size // self.dp_size,
        )
        self.sampler = BucketBatchSampler(
            self.dataset.bucket_keys(),
            spec,
            seed=config.seed,
            rank=self.dp_rank,
            world_size=self.dp_size,
        )
        self.loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=collate_latents
        )
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=config.keep_last)
        self.dcp = self._make_dcp_checkpointer() if self.env.is_distributed else None
        self.step = 0
        self.epoch = 0
        self.consumed = 0
        self.train_seconds = 0.0
        self._draw = _Draw(micro_batch=0, offset=0, global_size=config.batch_size)
        self._tae = None  # loaded on the first sample
        self._cached_flops_per_token: float | None = None

    # ------------------------------------------------------------------ data

    def _batches(self):
        """Endless batches; the trainer owns the epoch counter (exact resume)."""
        resumed_mid_epoch = self.consumed > 0
        while True:
            if not resumed_mid_epoch:
                self.sampler.set_epoch(self.epoch)
            resumed_mid_epoch = False
            for batch in self.loader:
                self.consumed += 1
                yield batch
            self.epoch += 1
            self.consumed = 0

    def _locate(self, micro_batch: int, batch_size: int) -> _Draw:
        """This rank's place in the global micro-batch (one small all-gather when distributed)."""
        sizes = all_gather_sizes(batch_size, self.device)[:: self.cp_size]
        return _Draw(
            micro_batch=micro_batch,
            offset=sum(sizes[: self.dp_rank]),
            global_size=sum(sizes),
        )

    def _generator(self, stream: int, *sample: int) -> torch.Generator:
        return keyed_generator(self.config.seed, stream, self._draw.micro_batch, *sample)

    def _local(self, values: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's slice of per-sample values drawn for the whole global micro-batch."""
        return values[self._draw.offset : self._draw.offset + batch_size]

    def _drop_captions(self, text: TextFeatures) -> TextFeatures:
        """Replace a ``caption_dropout`` share of rows by the empty prompt."""
        batch_size = next(iter(text.values()))[0].shape[0]
        keep = caption_keep_mask(
            self._draw.global_size, self.config.caption_dropout, self._generator(_CAPTION_STREAM)
        )
        null = {name: (h[None], m[None]) for name, (h, m) in self.null_text.items()}
        return drop_features(text, self._local(keep, batch_size), null)

    def _timesteps(self, batch_size: int) -> torch.Tensor:
        """t ``(B,)``: drawn for the global micro-batch (cheap), this rank's slice kept."""
        t = self.t_sampler(self._draw.global_size, generator=self._generator(_TIMESTEP_STREAM))
        return self._local(t, batch_size)

    def _noise(self, shape: torch.Size) -> torch.Tensor:
        """The flow's source sample X_0 ~ N(0, I) ``(B, C, T, H, W)``, drawn on the CPU
        per sample from a stream keyed by its position in the global micro-batch."""
        return torch.stack(
            [
                torch.randn(shape[1:], generator=self._generator(_NOISE_STREAM, position))
                for position in range(self._draw.offset, self._draw.offset + shape[0])
            ]
        )

    # ------------------------------------------------------------------ state

    def _metadata(self) -> dict:
        return {
            "kind": T2V_KIND,
            "config": config_to_dict(self.config),
            "precompute": self.precompute_meta,
        }

    def _check_saved_config(self, saved: dict, path: Path) -> None:
        if saved.get("model") != config_to_dict(self.config)["model"]:
            raise ValueError(
                f"{path} was trained with another transformer config; "
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
        return True

    # ------------------------------------------------------------------ steps

    def _train_step(self, batches) -> tuple[dict[str, float], np.ndarray, np.ndarray, int]:
        """One optimizer step; returns logs (global means), this rank's per-sample t
        and losses, and the number of video tokens processed by all data ranks."""
        config = self.config
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        ts, losses = [], []
        # Per micro-batch: summed loss and sample count; then tokens (summed over ranks).
        totals = torch.zeros(2 * config.grad_accum + 1, dtype=torch.float64)
        for micro in range(config.grad_accum):
            batch = next(batches)
            x1 = batch["latent"].to(self.device)  # (B, C, T, H, W)
            batch_size = x1.shape[0]
            self._draw = self._locate(self.step * config.grad_accum + micro, batch_size)
            text = _to_device(self._drop_captions(batch["text"]), self.device)
            t = self._timesteps(batch_size).to(self.device)
            x0 = self._noise(x1.shape).to(self.device)
            xt = self.path.interpolate(x0, x1, t)
            target = self.path.velocity_target(x0, x1)
            prediction = self.model(xt, t, text)
            per_sample = (prediction.float() - target).pow(2).flatten(1).mean(1)  # (B,)
            # The global micro-batch's mean: gradients are averaged over the
            # data-parallel ranks, so scale this rank's sum by ranks / samples.
            loss = per_sample.sum() * (self.dp_size / self._draw.global_size)
            (loss / config.grad_accum).backward()
            totals[micro] = float(per_sample.detach().double().sum())
            totals[config.grad_accum + micro] = batch_size
            totals[-1] += batch_size * num_video_tokens(self.config.model, tuple(x1.shape[2:]))
            ts.append(t.detach().cpu().numpy())
            losses.append(per_sample.detach().cpu().numpy())
        # Context-parallel ranks hold the same samples: count them once.
        totals = all_reduce_sum(totals) / self.cp_size
        sums, counts = totals[: config.grad_accum], totals[config.grad_accum : -1]
        logs = {"loss/flow": float((sums / counts).mean())}
        if config.grad_clip > 0:
            logs["train/grad_norm"] = self._clip_gradients()
        self.optimizer.step()
        self._step_scheduler()
        if self.ema is not None:
            self.ema.update(self.ema_view)
        logs["train/lr"] = self.scheduler.get_last_lr()[0]
        return logs, np.concatenate(ts), np.concatenate(losses), int(totals[-1])

    def _clip_gradients(self) -> float:
        """Clip the global gradient norm to ``grad_clip``; returns the norm before clipping."""
        grads = [param.grad for param in self.model.parameters() if param.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.mesh is not None:
            from torch.distributed.tensor import DTensor

            if isinstance(norm, DTensor):  # sharded gradients: a sum over the shards
                norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.config.grad_clip, norm)
        return float(norm)

    def _t_bucket_logs(self, ts: list[np.ndarray], losses: list[np.ndarray]) -> dict[str, float]:
        t, loss = np.concatenate(ts), np.concatenate(losses)
        if self.env.is_distributed:
            import torch.distributed as dist

            gathered: list = [None] * self.env.world_size
            dist.all_gather_object(gathered, (t, loss))
            t = np.concatenate([part[0] for part in gathered[:: self.cp_size]])
            loss = np.concatenate([part[1] for part in gathered[:: self.cp_size]])
        count = self.config.num_t_buckets
        bucket = np.minimum((t * count).astype(int), count - 1)
        logs = {}
        for k in range(count):
            if (bucket == k).any():
                logs[f"loss_t/{k / count:.1f}-{(k + 1) / count:.1f}"] = float(
                    loss[bucket == k].mean()
                )
        return logs

    # ------------------------------------------------------------------ samples

    def _sample_prompts(self) -> tuple[list[str], TextFeatures, tuple[int, ...]]:
        """The first distinct training captions, their features and latent shape."""
        seen: dict[str, int] = {}
        for position, caption in enumerate(self.dataset.captions):
            if caption not in seen:
                seen[caption] = position
            if len(seen) == self.config.num_sample_prompts:
                break
        items = [self.dataset[position] for position in seen.values()]
        text = pad_text_features([item["text"] for item in items])
        return list(seen), text, tuple(items[0]["latent"].shape)

    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """Sample videos for a few training captions (EMA weights) into
        ``samples/step_XXXXXXXX.mp4``, captions in a ``.txt`` beside it.

        Distributed: every rank runs the (sharded) transformer on the same
        prompts; rank 0 alone decodes and writes (other ranks return None).
        """
        if self.config.num_sample_prompts < 1:
            return None
        if self._tae is None and self.env.is_main:
            self._tae = load_tae(self.precompute_meta["tae_checkpoint"], map_location=self.device)
        captions, text, shape = self._sample_prompts()
        negative = repeat_text_features(
            {name: (h[None], m[None]) for name, (h, m) in self.null_text.items()}, len(captions)
        )
        context = (
            self.ema.swapped_into(self.ema_view)
            if self.ema is not None
            else contextlib.nullcontext()
        )
        with context:
            latents = generate_latents(
                self.model,
                _to_device(text, self.device),
                _to_device(negative, self.device),
                latent_shape=shape,
                seeds=list(range(len(captions))),
                steps=self.config.sample_steps,
                cfg_scale=self.config.sample_cfg,
            )
        if not self.env.is_main:
            return None
        geometry = self.precompute_meta["config"]
        video = self._tae.decode(latents, num_frames=geometry["num_frames"])
        grid = clip_grid(
            [to_uint8_frames(clip) for clip in video],
            columns=min(SAMPLE_GRID_COLUMNS, len(captions)),
            scale=max(1, SAMPLE_TILE_PIXELS // geometry["size"]),
        )
        path = self.run_dir / "samples" / f"step_{self.step:08d}.mp4"
        write_video(path, grid, fps=geometry["fps"] or SAMPLE_FPS)
        path.with_suffix(".txt").write_text(
            "".join(strip_fps_prefix(caption) + "\n" for caption in captions)
        )
        return path

    # ------------------------------------------------------------------ loop

    def train(self, *, stop_at: int | None = None) -> dict[str, float]:
        """Run until ``steps`` (or the time budget, or ``stop_at``, which stops
        early as an interruption would, after a checkpoint); returns the last logs.
        Distributed: every rank calls it; the logs are the same on every rank."""
        config = self.config
        main = self.env.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        resumed = self.resume()
        if main:
            save_config(config, self.run_dir / "config.json")
        # Only rank 0 logs MFU; the others need no peak.
        peak = config.peak_flops or (measure_matmul_flops(device=self.device) if main else 1.0)
        batches = self._batches()
        logger = ScalarLogger(self.run_dir) if main else None
        bar = tqdm(
            total=config.steps,
            initial=self.step,
            desc="t2v",
            unit="step",
            disable=not self.progress,
        )
        if resumed and main:
            tqdm.write(f"resumed from step {self.step} in {self.run_dir}")
        if self.dataset.skips.total and main:
            tqdm.write(f"precompute skipped clips: {self.dataset.skips.summary()}")
        logs: dict[str, float] = {}
        window_ts: list[np.ndarray] = []
        window_losses: list[np.ndarray] = []
        window_tokens, window_flops, window_seconds = 0, 0.0, 0.0
        start_seconds = self.train_seconds
        started = time.perf_counter()
        try:
            while self.step < config.steps:
                step_started = time.perf_counter()
                logs, ts, losses, tokens = self._train_step(batches)
                window_seconds += time.perf_counter() - step_started
                self.step += 1
                self.train_seconds = start_seconds + time.perf_counter() - started
                window_ts.append(ts)
                window_losses.append(losses)
                window_tokens += tokens
                window_flops += tokens * self._flops_per_token()
                bar.update(1)
                if self.step % config.log_every == 0:
                    logs.update(self._t_bucket_logs(window_ts, window_losses))
                    logs["perf/tokens_per_s"] = window_tokens / window_seconds
                    # Per device: the job's FLOPs over all of its devices.
                    logs["perf/mfu"] = model_flops_utilisation(
                        window_flops / self.env.world_size, window_seconds, peak
                    )
                    logs["train/seconds"] = self.train_seconds
                    if logger is not None:
                        logger.log(self.step, logs)
                    bar.set_postfix(loss=f"{logs['loss/flow']:.4f}", mfu=f"{logs['perf/mfu']:.1%}")
                    window_ts, window_losses = [], []
                    window_tokens, window_flops, window_seconds = 0, 0.0, 0.0
                out_of_time = (
                    config.time_budget_s is not None and self.train_seconds >= config.time_budget_s
                )
                if config.time_budget_s is not None:
                    # Each rank's clock differs a little: stop together.
                    out_of_time = any_rank(out_of_time, self.device)
                interrupted = stop_at is not None and self.step >= stop_at
                finished = self.step == config.steps or out_of_time or interrupted
                if config.sample_every and (self.step % config.sample_every == 0 or finished):
                    self.write_samples()
                if self.step % config.checkpoint_every == 0 or finished:
                    self.save(final=finished)
                    # With each checkpoint rather than each log line: a plot
                    # costs far more than a small model's step.
                    if main and self.step >= config.log_every:
                        plot_curves(logger.csv_path, self.run_dir / "loss_curves.png")
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
        return logs

    def _flops_per_token(self) -> float:
        """Training FLOPs per video token at the first sample's latent shape and
        text length (used for MFU; buckets of other shapes are close enough)."""
        if self._cached_flops_per_token is None:
            shape = self.dataset[0]["latent"].shape
            num_tokens = num_video_tokens(self.config.model, tuple(shape[1:]))
            num_text = sum(int(h.shape[0]) for h, _ in self.dataset[0]["text"].values())
            flops = train_step_flops(self.config.model, num_tokens, num_text)
            self._cached_flops_per_token = flops / num_tokens
        return self._cached_flops_per_token
