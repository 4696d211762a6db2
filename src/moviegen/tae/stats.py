"""Per-channel latent statistics: measured on data, stored with the checkpoint.

Flow matching wants latents of roughly unit scale per channel. Rather than a
hard-coded scale constant (which goes stale when the architecture changes),
``moviegen tae stats`` measures the mean and standard deviation of the
posterior mean of every latent channel over a dataset, and writes them into
the checkpoint's metadata; :func:`moviegen.tae.checkpoint.load_tae` loads them
into the model, whose ``encode``/``decode`` then normalise and de-normalise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from moviegen.data.clips import iter_clips, list_media
from moviegen.data.dataset import SkipCounter
from moviegen.tae.checkpoint import LATENT_STATS_KEY, load_tae
from moviegen.tae.model import TAE
from moviegen.train.checkpoint import CheckpointManager

__all__ = [
    "LatentStatsAccumulator",
    "batch_same_shape",
    "measure_latent_stats",
    "store_latent_stats",
]

# Clips per encoder call. On 2 CPU cores (cpu recipe, 16x64x64 clips) batches
# of 2-4 take 35-40 ms per clip, single clips 150 ms, batches of 16 56 ms.
STATS_BATCH_SIZE = 4


def batch_same_shape(
    videos: Iterable[torch.Tensor], batch_size: int = STATS_BATCH_SIZE
) -> Iterable[torch.Tensor]:
    """Concatenate consecutive ``(1, C, T, H, W)`` clips of one shape into batches."""
    pending: list[torch.Tensor] = []
    for video in videos:
        if pending and pending[0].shape != video.shape:
            yield torch.cat(pending)
            pending = []
        pending.append(video)
        if len(pending) == batch_size:
            yield torch.cat(pending)
            pending = []
    if pending:
        yield torch.cat(pending)


class LatentStatsAccumulator:
    """Running per-channel mean and variance in float64 (sums of x and x^2).

    float64 sums are exact enough for the value ranges and counts involved
    (latents of order 10, up to ~1e10 elements) and merge trivially.
    """

    def __init__(self, num_channels: int):
        self.count = 0
        self.total = torch.zeros(num_channels, dtype=torch.float64)
        self.total_squares = torch.zeros(num_channels, dtype=torch.float64)

    def update(self, latents: torch.Tensor) -> None:
        """Add latents ``(B, C, T, H, W)``."""
        values = latents.detach().transpose(0, 1).flatten(1).to(torch.float64)  # (C, N)
        self.count += values.shape[1]
        self.total += values.sum(dim=1).cpu()
        self.total_squares += values.square().sum(dim=1).cpu()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` per channel, float32."""
        if self.count < 2:
            raise ValueError("need at least two latent values per channel for statistics")
        mean = self.total / self.count
        variance = (self.total_squares / self.count - mean.square()).clamp(min=0)
        return mean.float(), variance.sqrt().float()


@torch.no_grad()
def measure_latent_stats(
    tae: TAE, videos: Iterable[torch.Tensor], *, progress: bool = True, total: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and std of every channel of the posterior mean over ``videos``.

    Args:
        tae: the autoencoder (eval mode is set here).
        videos: batches ``(B, 3, T, H, W)`` in ``[-1, 1]``.
        progress: show a progress bar.
        total: number of batches, for the bar.

    Returns:
        ``(mean, std, num_clips)``; mean and std have shape ``(latent_channels,)``.
    """
    tae.eval()
    device = next(tae.parameters()).device
    accumulator = LatentStatsAccumulator(tae.config.latent_channels)
    num_clips = 0
    for video in tqdm(videos, desc="latent stats", unit="batch", total=total, disable=not progress):
        mean, _ = tae.split_moments(tae.encode_moments(video.to(device)))
        accumulator.update(mean)
        num_clips += video.shape[0]
    if num_clips == 0:
        raise ValueError("no clips to measure latent statistics on")
    latent_mean, latent_std = accumulator.result()
    if not (latent_std > 0).all():
        raise ValueError("a latent channel is constant over the data (std 0)")
    return latent_mean, latent_std, num_clips


def store_latent_stats(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    *,
    size: int | None = None,
    num_frames: int | None = None,
    max_clips: int | None = None,
    progress: bool = True,
) -> tuple[Path, dict, SkipCounter]:
    """Measure latent statistics of a TAE checkpoint on ``data`` (manifest or
    folder) and write them into the checkpoint's metadata.

    Returns the checkpoint folder, the stored statistics and the skipped files.
    """
    folder = CheckpointManager.resolve(checkpoint)
    tae = load_tae(folder)
    paths = list_media(data)[:max_clips]
    skips = SkipCounter()
    clips = (video for _, video in iter_clips(paths, size=size, num_frames=num_frames, skips=skips))
    mean, std, count = measure_latent_stats(
        tae, batch_same_shape(clips), progress=progress, total=-(-len(paths) // STATS_BATCH_SIZE)
    )
    stats = {"mean": mean.tolist(), "std": std.tolist(), "num_clips": count, "data": str(data)}
    CheckpointManager.update_metadata(folder, {LATENT_STATS_KEY: stats})
    return folder, stats, skips
