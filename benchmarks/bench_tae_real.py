"""Ours against Wan 2.1's VAE, both trained from scratch on real clips, scored on held-out clips.

Both autoencoders are built at a matched width (``bench_tae_speed.wan_kwargs``),
16 latent channels, and trained in turn in the same process on the same data:

- data: every video in the real-data folder except the held-out clips (and the
  excluded ones: ``carphone_distorted.mp4`` is a degraded copy of the held-out
  ``carphone_pristine.mp4``), decoded once up front with the shorter side resized
  to ``--short-side``; step ``i`` draws the same random clips, windows and
  ``--crop`` x ``--crop`` crops for both models (seeded by ``(seed, i)``). Ours
  trains on the first ``--frames-ours`` frames of each window, Wan on
  ``--frames-wan`` (Wan needs ``1 + 4k``);
- objective: ``l1_weight * L1 + kl_weight * KL`` (the project's mean-reduced
  :func:`~moviegen.tae.losses.l1_reconstruction` and
  :func:`~moviegen.tae.losses.kl_divergence` for both), on a posterior sample;
- optimiser: AdamW with the same learning rate and settings, gradient clipping;
- length: each model trains until ``--budget-s`` seconds of training or ``--steps``
  steps, whichever comes first; both numbers are recorded. Wan trains first; ours
  is also scored when it reaches Wan's final step count, so the report holds an
  equal-steps and an equal-wall-clock comparison.

Scoring: PSNR and SSIM (:mod:`moviegen.eval.metrics`, range 2 for ``[-1, 1]``) of the
posterior-mean reconstruction, clamped to ``[-1, 1]``, of centre ``--crop`` crops of
``--eval-frames``-frame windows of the held-out clips; both models see the same
windows. Ours compresses time 8x, Wan 4x, so Wan keeps about twice the latent
frames (5 to our 3 at 17 frames): the table says so.

Wan's public ``decode`` clamps its output to ``[-1, 1]``, which zeroes the gradient of
every overshooting pixel; training therefore calls :func:`wan_decode_unclamped`, the
same frame-by-frame cached decode without the clamp (scoring uses the public API).
Wan trains as diffusers ships it (contiguous weights; ``--wan-layout channels_last``
gives it ours' layout, see ``bench_tae_speed.set_conv3d_layout``). With
``--batch-size 1`` PyTorch's CPU heuristic sends the Conv3d layers of the small,
low-resolution levels (batch 1 and ``C*T*H`` below about 20k) to its slow native
kernel rather than oneDNN, for both models; ``--batch-size 2`` runs every level on
oneDNN (faster per clip on 2 cores, at about twice the memory: peak ~3.7 GB ours,
~6 GB Wan at width 32).

Usage (needs the benchmark-only dependency ``diffusers``)::

    python benchmarks/bench_tae_real.py [--real-data ../shared/data/real] \
        [--budget-s 600] [--steps 5000] [--widths 32,64,128,128] [--json-out FILE]
    python benchmarks/bench_tae_real.py --budget-s 60     # quick smoke test
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench_tae_speed import (
    DEFAULT_NORM_GROUPS,
    DEFAULT_NUM_RES_BLOCKS,
    OURS_TIME_COMPRESSION,
    SPATIAL_COMPRESSION,
    WAN_LAYOUTS,
    WAN_TIME_COMPRESSION,
    build_models,
    count_parameters,
    parse_widths,
    set_conv3d_layout,
    wan_kwargs,
)
from moviegen.data.video_io import is_media_path, read_video
from moviegen.eval.metrics import psnr, ssim
from moviegen.tae.losses import kl_divergence, l1_reconstruction
from moviegen.tae.model import TAE

DEFAULT_REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
DEFAULT_HOLDOUT = ("carphone_pristine.mp4", "IMG_0000_h9ZooJOAZSE.mp4")
# Same scene as the held-out carphone_pristine.mp4 (a degraded copy): training on it
# would leak the held-out content.
DEFAULT_EXCLUDE = ("carphone_distorted.mp4",)
DEFAULT_WIDTHS = "32,64,128,128"
# carphone's native height, so that held-out clip is scored unresampled.
DEFAULT_SHORT_SIDE = 144
DEFAULT_CROP = 128
# Training decodes at most this many frames per clip, to keep memory modest
# (bikes.mp4 has 250).
DEFAULT_MAX_TRAIN_FRAMES = 128
DEFAULT_LR = 3e-4
DEFAULT_WEIGHT_DECAY = 0.0
DEFAULT_GRAD_CLIP = 1.0
DEFAULT_KL_WEIGHT = 1e-6  # as TAELossConfig: per-element mean KL
DEFAULT_L1_WEIGHT = 1.0
# Mean train L1 is reported over this many final steps.
FINAL_LOSS_WINDOW = 20


# ----------------------------------------------------------------------------- data


def to_video(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 (T, H, W, 3)`` -> float ``(3, T, H, W)`` in ``[-1, 1]``."""
    frames = torch.as_tensor(frames)
    return frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0


def centre_crop(frames: np.ndarray, crop: int) -> np.ndarray:
    """Centre ``crop`` x ``crop`` of ``(T, H, W, 3)`` frames."""
    height, width = frames.shape[1:3]
    top, left = (height - crop) // 2, (width - crop) // 2
    return frames[:, top : top + crop, left : left + crop]


def load_training_clips(
    paths: list[Path], *, short_side: int, crop: int, num_frames: int, max_frames: int
) -> dict[str, torch.Tensor]:
    """Decode each clip once: ``name -> uint8 (T, H, W, 3)``; too short or small ones skipped."""
    clips = {}
    for path in paths:
        frames = read_video(path, size=short_side)[:max_frames]
        if frames.shape[0] < num_frames or min(frames.shape[1:3]) < crop:
            print(
                f"skipping {path.name}: {tuple(frames.shape[:3])} is below "
                f"{num_frames}x{crop}x{crop}"
            )
            continue
        clips[path.name] = torch.from_numpy(np.ascontiguousarray(frames))
    return clips


def training_batch(
    clips: list[torch.Tensor], step: int, *, seed: int, batch_size: int, num_frames: int, crop: int
) -> torch.Tensor:
    """The batch of step ``step``: ``(B, 3, num_frames, crop, crop)`` in ``[-1, 1]``.

    A function of ``(seed, step)`` only, so every model sees the same data at a step
    however many steps it runs.
    """
    rng = np.random.default_rng([seed, step])
    samples = []
    for _ in range(batch_size):
        clip = clips[rng.integers(len(clips))]
        frames, height, width = clip.shape[:3]
        start = rng.integers(frames - num_frames + 1)
        top, left = rng.integers(height - crop + 1), rng.integers(width - crop + 1)
        window = clip[start : start + num_frames, top : top + crop, left : left + crop]
        samples.append(to_video(window))
    return torch.stack(samples)


@dataclass(frozen=True)
class EvalWindow:
    clip: str
    start: int
    video: torch.Tensor  # (1, 3, T, crop, crop) in [-1, 1]


def load_eval_windows(
    paths: list[Path], *, short_side: int, crop: int, num_frames: int, windows_per_clip: int
) -> list[EvalWindow]:
    """Evenly spaced ``num_frames`` windows (centre crops) of each held-out clip."""
    windows = []
    for path in paths:
        frames = read_video(path, size=short_side)
        if frames.shape[0] < num_frames or min(frames.shape[1:3]) < crop:
            raise ValueError(
                f"held-out clip {path.name} is {tuple(frames.shape[:3])} at short side "
                f"{short_side}: it needs {num_frames} frames and {crop}x{crop} pixels"
            )
        last_start = frames.shape[0] - num_frames
        starts = sorted({round(x) for x in np.linspace(0, last_start, windows_per_clip)})
        for start in starts:
            window = centre_crop(frames[start : start + num_frames], crop)
            windows.append(EvalWindow(path.name, start, to_video(window).unsqueeze(0)))
    return windows


# ----------------------------------------------------------------------------- models


def wan_decode_unclamped(model: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLWan._decode`` without its final clamp (which zeroes gradients).

    Decodes latent frame by frame through Wan's causal feature cache, exactly as
    the public ``decode`` does: ``(B, 16, T', h, w)`` -> ``(B, 3, 1 + 4 (T' - 1), 8h, 8w)``.
    """
    # diffusers >= 0.35 marks the first latent frame (Wan 2.2's residual upsamplers
    # need it); older releases have no such argument.
    first_chunk_arg = "first_chunk" in inspect.signature(model.decoder.forward).parameters
    model.clear_cache()
    hidden = model.post_quant_conv(latents)
    frames = []
    for index in range(hidden.shape[2]):
        model._conv_idx = [0]
        extra = {"first_chunk": index == 0} if first_chunk_arg else {}
        frames.append(
            model.decoder(
                hidden[:, :, index : index + 1],
                feat_cache=model._feat_map,
                feat_idx=model._conv_idx,
                **extra,
            )
        )
    model.clear_cache()
    return torch.cat(frames, dim=2)


@dataclass
class Contender:
    """One autoencoder under test, behind two functions.

    ``train_pass(video, generator) -> (reconstruction, mean, logvar)`` on a posterior
    sample; ``reconstruct(video) -> video`` from the posterior mean, clamped.
    """

    name: str
    model: nn.Module
    train_frames: int
    time_compression: int
    constructor: str
    train_pass: Callable
    reconstruct: Callable
    params: int = field(init=False)

    def __post_init__(self) -> None:
        self.params = count_parameters(self.model)


def ours_contender(model: TAE, train_frames: int) -> Contender:
    def train_pass(video, generator):
        return model(video, generator=generator)

    def reconstruct(video):
        mean, _ = TAE.split_moments(model.encode_moments(video))
        return model.decode_latents(mean, num_frames=video.shape[2]).clamp(-1, 1)

    return Contender(
        "ours",
        model,
        train_frames,
        OURS_TIME_COMPRESSION,
        repr(model.config),
        train_pass,
        reconstruct,
    )


def wan_contender(
    model: nn.Module, train_frames: int, constructor: str, layout: str = "contiguous"
) -> Contender:
    set_conv3d_layout(model, layout)
    memory_format = WAN_LAYOUTS[layout]

    def train_pass(video, generator):
        video = video.contiguous(memory_format=memory_format)
        posterior = model.encode(video).latent_dist  # logvar clamped to [-30, 20] as ours
        noise = torch.randn(posterior.mean.shape, generator=generator)
        latents = posterior.mean + posterior.std * noise
        return wan_decode_unclamped(model, latents), posterior.mean, posterior.logvar

    def reconstruct(video):
        video = video.contiguous(memory_format=memory_format)
        return model.decode(model.encode(video).latent_dist.mode()).sample  # clamped

    return Contender(
        "wan2.1", model, train_frames, WAN_TIME_COMPRESSION, constructor, train_pass, reconstruct
    )


# ----------------------------------------------------------------------------- train / evaluate


def evaluate(contender: Contender, windows: list[EvalWindow]) -> list[dict]:
    """PSNR and SSIM of each held-out window's reconstruction."""
    contender.model.eval()
    scores = []
    with torch.inference_mode():
        for window in windows:
            reconstruction = contender.reconstruct(window.video)
            scores.append(
                {
                    "clip": window.clip,
                    "start": window.start,
                    "psnr": float(psnr(reconstruction, window.video)[0]),
                    "ssim": float(ssim(reconstruction, window.video)[0]),
                }
            )
    contender.model.train()
    return scores


def summarise(scores: list[dict]) -> dict:
    return {
        "psnr": statistics.fmean(score["psnr"] for score in scores),
        "ssim": statistics.fmean(score["ssim"] for score in scores),
        "windows": scores,
    }


def train(
    contender: Contender,
    clips: list[torch.Tensor],
    windows: list[EvalWindow],
    args: argparse.Namespace,
    *,
    eval_at_step: int | None = None,
) -> dict:
    """Train until ``args.budget_s`` seconds or ``args.steps`` steps; score at the end
    (and at ``eval_at_step``, off the clock, when that comes before the end)."""
    model = contender.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed + 1)
    window_frames = max(args.frames_ours, args.frames_wan)
    losses, curve, snapshot = [], [], None
    train_s, step = 0.0, 0
    stop_reason = "steps"
    while step < args.steps:
        if train_s >= args.budget_s:
            stop_reason = "budget"
            break
        start = time.perf_counter()
        batch = training_batch(
            clips,
            step,
            seed=args.seed,
            batch_size=args.batch_size,
            num_frames=window_frames,
            crop=args.crop,
        )[:, :, : contender.train_frames]
        reconstruction, mean, logvar = contender.train_pass(batch, generator)
        l1 = l1_reconstruction(reconstruction, batch)
        loss = args.l1_weight * l1 + args.kl_weight * kl_divergence(mean, logvar)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        train_s += time.perf_counter() - start
        step += 1
        losses.append(float(l1.detach()))
        if not torch.isfinite(loss):
            stop_reason = "non-finite loss"
            break
        if step % args.log_every == 0:
            curve.append({"step": step, "train_s": train_s, "l1": losses[-1]})
            print(
                f"  {contender.name} step {step:5d} {train_s:7.1f}s L1 {losses[-1]:.4f}", flush=True
            )
        # Scored only when training goes on after it; otherwise the final score is it.
        if step == eval_at_step and step < args.steps and train_s < args.budget_s:
            snapshot = {
                "steps": step,
                "train_s": train_s,
                "train_l1": statistics.fmean(losses[-FINAL_LOSS_WINDOW:]),
                **summarise(evaluate(contender, windows)),
            }
    if snapshot is not None and snapshot["steps"] == step:
        snapshot = None  # the final score is the same
    return {
        "model": contender.name,
        "constructor": contender.constructor,
        "params": contender.params,
        "train_frames": contender.train_frames,
        "time_compression": contender.time_compression,
        "steps": step,
        "train_s": train_s,
        "s_per_step": train_s / max(step, 1),
        "stop_reason": stop_reason,
        "train_l1": statistics.fmean(losses[-FINAL_LOSS_WINDOW:]) if losses else None,
        "curve": curve,
        "final": summarise(evaluate(contender, windows)),
        "at_other_steps": snapshot,
    }


# ----------------------------------------------------------------------------- report


def latent_frames(time_compression: int, num_frames: int) -> int:
    if time_compression == WAN_TIME_COMPRESSION:
        return 1 + (num_frames - 1) // WAN_TIME_COMPRESSION  # causal: first frame alone
    return -(-num_frames // time_compression)


def print_report(results: list[dict], args: argparse.Namespace, data: dict) -> None:
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads, torch {torch.__version__}, fp32; "
        f"train clips: {', '.join(data['train_clips'])}; "
        f"held out: {', '.join(data['holdout_clips'])}"
    )
    print(
        f"budget {args.budget_s:g}s or {args.steps} steps each, batch {args.batch_size}, "
        f"{args.crop}x{args.crop} crops at short side {args.short_side}, AdamW lr {args.lr:g}, "
        f"loss {args.l1_weight:g} L1 + {args.kl_weight:g} KL; scored on "
        f"{len(data['eval_windows'])} centre-crop windows of {args.eval_frames} frames. "
        "Ours compresses time 8x, Wan 2.1 4x (both space 8x)."
    )
    crop_latent = args.crop // SPATIAL_COMPRESSION
    print(
        "\n| model | params (M) | latent per window | train frames | steps | train s "
        f"| s/step | stopped by | train L1 (last {FINAL_LOSS_WINDOW}) | PSNR dB | SSIM |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|")
    rows = []
    for result in results:
        final = {"steps": result["steps"], "train_s": result["train_s"]}
        final.update(train_l1=result["train_l1"], **result["final"])
        rows.append((result["model"], result["stop_reason"], result, final))
        snapshot = result["at_other_steps"]
        if snapshot is not None:
            label = f"{result['model']} @ {snapshot['steps']} steps"
            rows.append((label, "equal steps", result, snapshot))
    for label, stopped, result, scores in rows:
        frames = latent_frames(result["time_compression"], args.eval_frames)
        steps, train_s, train_l1 = scores["steps"], scores["train_s"], scores["train_l1"]
        print(
            f"| {label} | {result['params'] / 1e6:.2f} | 16x{frames}x{crop_latent}x{crop_latent} "
            f"| {result['train_frames']} | {steps} | {train_s:.0f} | {train_s / max(steps, 1):.2f} "
            f"| {stopped} | {'' if train_l1 is None else f'{train_l1:.4f}'} "
            f"| {scores['psnr']:.2f} | {scores['ssim']:.4f} |"
        )
    names = [result["model"] for result in results]
    print("\n| held-out clip | start | " + " | ".join(f"{n} PSNR | {n} SSIM" for n in names) + " |")
    print("|---|---:|" + "---:|---:|" * len(names))
    for index, window in enumerate(results[0]["final"]["windows"]):
        cells = []
        for result in results:
            score = result["final"]["windows"][index]
            cells.append(f"{score['psnr']:.2f} | {score['ssim']:.4f}")
        print(f"| {window['clip']} | {window['start']} | " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--real-data",
        type=Path,
        default=Path(os.environ.get("MOVIEGEN_REAL_DATA", DEFAULT_REAL_DATA)),
        help="folder of real clips (default: $MOVIEGEN_REAL_DATA or ../shared/data/real)",
    )
    parser.add_argument("--holdout", nargs="+", default=list(DEFAULT_HOLDOUT))
    parser.add_argument("--exclude", nargs="*", default=list(DEFAULT_EXCLUDE))
    parser.add_argument("--budget-s", type=float, default=600.0, help="training seconds per model")
    parser.add_argument("--steps", type=int, default=5000, help="max training steps per model")
    parser.add_argument("--widths", type=parse_widths, default=parse_widths(DEFAULT_WIDTHS))
    parser.add_argument("--num-res-blocks", type=int, default=DEFAULT_NUM_RES_BLOCKS)
    parser.add_argument("--norm-groups", type=int, default=DEFAULT_NORM_GROUPS)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--wan-layout",
        choices=sorted(WAN_LAYOUTS),
        default="contiguous",
        help="Wan's Conv3d weight layout: contiguous (as shipped) or channels_last (as ours)",
    )
    parser.add_argument("--frames-ours", type=int, default=8, help="training window, ours")
    parser.add_argument("--frames-wan", type=int, default=9, help="training window, Wan (1 + 4k)")
    parser.add_argument("--eval-frames", type=int, default=17, help="held-out windows (1 + 4k)")
    parser.add_argument("--eval-windows", type=int, default=2, help="windows per held-out clip")
    parser.add_argument("--short-side", type=int, default=DEFAULT_SHORT_SIDE)
    parser.add_argument("--crop", type=int, default=DEFAULT_CROP)
    parser.add_argument("--max-train-frames", type=int, default=DEFAULT_MAX_TRAIN_FRAMES)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY)
    parser.add_argument("--grad-clip", type=float, default=DEFAULT_GRAD_CLIP, help="0: off")
    parser.add_argument("--l1-weight", type=float, default=DEFAULT_L1_WEIGHT)
    parser.add_argument("--kl-weight", type=float, default=DEFAULT_KL_WEIGHT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    for name in ("frames_wan", "eval_frames"):
        value = getattr(args, name)
        if value < 1 or (value - 1) % WAN_TIME_COMPRESSION:
            parser.error(f"--{name.replace('_', '-')} must be 1 + 4k for Wan, got {value}")
    if args.crop % SPATIAL_COMPRESSION or not 0 < args.crop <= args.short_side:
        parser.error(f"--crop must be a multiple of {SPATIAL_COMPRESSION} and at most --short-side")
    if any(width % args.norm_groups for width in args.widths):
        parser.error(f"--norm-groups {args.norm_groups} must divide every width {args.widths}")
    positive = ("budget_s", "steps", "batch_size", "frames_ours", "eval_windows", "log_every")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not args.real_data.is_dir():
        parser.error(
            f"no real-data folder at {args.real_data} (set --real-data or MOVIEGEN_REAL_DATA)"
        )
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    media = sorted(path for path in args.real_data.iterdir() if is_media_path(path))
    names = {path.name for path in media}
    missing = [name for name in args.holdout if name not in names]
    if missing:
        raise SystemExit(f"held-out clips not in {args.real_data}: {missing}")
    skip = set(args.holdout) | set(args.exclude)
    train_paths = [path for path in media if path.name not in skip]
    clips = load_training_clips(
        train_paths,
        short_side=args.short_side,
        crop=args.crop,
        num_frames=max(args.frames_ours, args.frames_wan),
        max_frames=args.max_train_frames,
    )
    if not clips:
        raise SystemExit(f"no usable training clips in {args.real_data}")
    windows = load_eval_windows(
        [args.real_data / name for name in args.holdout],
        short_side=args.short_side,
        crop=args.crop,
        num_frames=args.eval_frames,
        windows_per_clip=args.eval_windows,
    )
    data = {
        "train_clips": sorted(clips),
        "holdout_clips": list(args.holdout),
        "excluded_clips": list(args.exclude),
        "eval_windows": [(window.clip, window.start) for window in windows],
    }
    clip_list = [clips[name] for name in sorted(clips)]

    ours_model, wan_model = build_models(
        args.widths, args.num_res_blocks, args.norm_groups, seed=args.seed
    )
    wan = wan_contender(
        wan_model,
        args.frames_wan,
        f"AutoencoderKLWan(**{wan_kwargs(args.widths, args.num_res_blocks)})",
        layout=args.wan_layout,
    )
    ours = ours_contender(ours_model, args.frames_ours)
    print(f"training {wan.name} ({wan.params / 1e6:.2f}M params)", flush=True)
    wan_result = train(wan, clip_list, windows, args)
    print(f"training {ours.name} ({ours.params / 1e6:.2f}M params)", flush=True)
    ours_result = train(ours, clip_list, windows, args, eval_at_step=wan_result["steps"])
    results = [ours_result, wan_result]

    print_report(results, args, data)
    report = {
        "args": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        },
        "torch": torch.__version__,
        "data": data,
        "results": results,
    }
    text = json.dumps(report)
    print("\n" + text)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
