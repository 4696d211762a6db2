"""Pictures people can open: contact sheets of clips with captions, GIF grids."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["clip_grid", "contact_sheet"]

# Pixels between tiles and around the caption text.
PADDING = 4
CAPTION_HEIGHT = 14
BACKGROUND = (24, 24, 24)
TEXT_COLOUR = (235, 235, 235)


def _upscale(frame: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling keeps small synthetic clips crisp."""
    return frame.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else frame


def contact_sheet(
    clips: Sequence[tuple[np.ndarray, str]],
    path: str | os.PathLike,
    *,
    frames_per_clip: int = 4,
    scale: int = 2,
) -> Path:
    """One row per clip: evenly spaced frames, then its caption underneath.

    Args:
        clips: ``(frames uint8 (T, H, W, 3), caption)`` pairs; all the same H, W.
        path: output image (PNG).
        frames_per_clip: frames shown per row (evenly spaced from first to last).
        scale: nearest-neighbour upscaling factor.
    """
    if not clips:
        raise ValueError("contact_sheet needs at least one clip")
    heights_widths = {tuple(frames.shape[1:3]) for frames, _ in clips}
    if len(heights_widths) != 1:
        raise ValueError(f"clips must share one frame size, got {sorted(heights_widths)}")
    height, width = (side * scale for side in heights_widths.pop())
    row_height = height + CAPTION_HEIGHT + PADDING
    sheet_width = frames_per_clip * (width + PADDING) + PADDING
    sheet = Image.new("RGB", (sheet_width, len(clips) * row_height + PADDING), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, (frames, caption) in enumerate(clips):
        picks = np.linspace(0, len(frames) - 1, num=min(frames_per_clip, len(frames)))
        top = PADDING + row * row_height
        for column, frame_index in enumerate(picks.round().astype(int)):
            tile = Image.fromarray(_upscale(frames[frame_index], scale))
            sheet.paste(tile, (PADDING + column * (width + PADDING), top))
        draw.text((PADDING, top + height + 1), caption, fill=TEXT_COLOUR, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def clip_grid(clips: Sequence[np.ndarray], *, columns: int, scale: int = 1) -> np.ndarray:
    """Tile same-shape clips ``(T, H, W, 3)`` into one clip, row-major.

    Clips shorter than the longest hold their last frame. Returns
    ``uint8 (T, rows * (H + PADDING) + PADDING, columns * (W + PADDING) + PADDING, 3)``.
    """
    if not clips or columns <= 0:
        raise ValueError("clip_grid needs clips and a positive column count")
    num_frames = max(len(clip) for clip in clips)
    height, width = (side * scale for side in clips[0].shape[1:3])
    rows = -(-len(clips) // columns)
    grid = np.empty(
        (num_frames, rows * (height + PADDING) + PADDING, columns * (width + PADDING) + PADDING, 3),
        dtype=np.uint8,
    )
    grid[:] = BACKGROUND
    for position, clip in enumerate(clips):
        row, column = divmod(position, columns)
        top = PADDING + row * (height + PADDING)
        left = PADDING + column * (width + PADDING)
        for frame_index in range(num_frames):
            frame = _upscale(clip[min(frame_index, len(clip) - 1)], scale)
            grid[frame_index, top : top + height, left : left + width] = frame
    return grid
