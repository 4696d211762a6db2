"""TAE reconstruction quality on a manifest or a folder of videos: `moviegen tae eval`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from moviegen.data.clips import iter_clips, list_media
from moviegen.data.dataset import SkipCounter
from moviegen.eval.metrics import latent_outlier_stats, psnr, ssim
from moviegen.tae.model import TAE

__all__ = ["ReconstructionReport", "evaluate_tae"]


@dataclass
class ReconstructionReport:
    clips: list[dict] = field(default_factory=list)  # per clip: path, frames, psnr, ssim
    psnr: float = float("nan")
    ssim: float = float("nan")
    latent: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def format(self) -> str:
        width = max([len(Path(clip["path"]).name) for clip in self.clips] + [4])
        lines = [f"{'clip':<{width}}  {'frames':>6}  {'PSNR':>7}  {'SSIM':>6}"]
        for clip in self.clips:
            name = Path(clip["path"]).name
            lines.append(
                f"{name:<{width}}  {clip['frames']:>6}  {clip['psnr']:>7.2f}  {clip['ssim']:>6.4f}"
            )
        lines.append(f"{'mean':<{width}}  {'':>6}  {self.psnr:>7.2f}  {self.ssim:>6.4f}")
        if self.latent:
            lines.append(
                "latents: max z-score {max_zscore:.2f}, share above 3: {frac_above_3:.4f}, "
                "max |z| {max_abs:.2f}".format(**self.latent)
            )
        if self.skipped:
            lines.append(f"skipped: {self.skipped}")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_tae(
    tae: TAE,
    data: str | os.PathLike,
    *,
    size: int | None = None,
    num_frames: int | None = None,
    max_clips: int | None = None,
    progress: bool = True,
) -> ReconstructionReport:
    """PSNR, SSIM (on ``[-1, 1]`` data, peak-to-peak 2) and latent outlier
    statistics of ``tae`` on every clip of ``data``; long clips are tiled."""
    tae.eval()
    device = next(tae.parameters()).device
    paths = list_media(data)[:max_clips]
    skips = SkipCounter()
    report = ReconstructionReport()
    latent_stats = []
    for path, video in tqdm(
        iter_clips(paths, size=size, num_frames=num_frames, skips=skips),
        total=len(paths),
        desc="eval",
        unit="clip",
        disable=not progress,
    ):
        video = video.to(device)
        reconstruction = tae.reconstruct(video)
        mean, _ = tae.split_moments(tae.encode_moments(video, chunks_at_once=1))
        latent_stats.append(latent_outlier_stats(mean))
        report.clips.append(
            {
                "path": str(path),
                "frames": video.shape[2],
                "psnr": float(psnr(reconstruction, video)[0]),
                "ssim": float(ssim(reconstruction, video)[0]),
            }
        )
    report.skipped = dict(skips.counts)
    if not report.clips:
        raise ValueError(f"no readable clips in {data} (skipped: {report.skipped})")
    report.psnr = sum(clip["psnr"] for clip in report.clips) / len(report.clips)
    report.ssim = sum(clip["ssim"] for clip in report.clips) / len(report.clips)
    report.latent = {
        "max_zscore": max(stats["max_zscore"] for stats in latent_stats),
        "frac_above_3": sum(stats["frac_above_3"] for stats in latent_stats) / len(latent_stats),
        "max_abs": max(stats["max_abs"] for stats in latent_stats),
    }
    return report
