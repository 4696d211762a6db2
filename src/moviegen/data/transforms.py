"""Conversions between decoded frames and model tensors, and caption helpers."""

from __future__ import annotations

import re

import numpy as np
import torch

__all__ = ["add_fps_prefix", "frames_to_tensor", "strip_fps_prefix", "to_uint8_frames"]

_FPS_PREFIX = re.compile(r"^FPS-(\d+(?:\.\d+)?) ")


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """``uint8 (T, H, W, 3)`` -> ``float32 (3, T, H, W)`` in ``[-1, 1]``."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)  # (3, T, H, W)
    return video.float().div_(127.5).sub_(1.0)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``float (3, T, H, W)`` in ``[-1, 1]`` -> ``uint8 (T, H, W, 3)``; values are clamped."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected (3, T, H, W), got {tuple(video.shape)}")
    scaled = (video.detach().float().clamp(-1, 1) + 1) * 127.5
    return scaled.round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def add_fps_prefix(caption: str, fps: float) -> str:
    """Movie Gen's frame-rate conditioning: ``FPS-16 a dog runs``.

    Integral rates print without a decimal point; an existing prefix is replaced.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    rate = f"{fps:g}" if float(fps).is_integer() else f"{fps:.2f}".rstrip("0")
    return f"FPS-{rate} {strip_fps_prefix(caption)}"


def strip_fps_prefix(caption: str) -> str:
    """Remove a leading ``FPS-N `` if there is one."""
    return _FPS_PREFIX.sub("", caption, count=1)
