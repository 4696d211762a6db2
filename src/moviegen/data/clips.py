"""Whole clips for evaluation and statistics: every file of a manifest or folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from moviegen.data.dataset import SkipCounter, SkippedSample
from moviegen.data.manifest import read_manifest
from moviegen.data.transforms import frames_to_tensor
from moviegen.data.video_io import VideoDecodeError, is_media_path, read_video

__all__ = ["iter_clips", "list_media"]


def list_media(data: str | os.PathLike) -> list[Path]:
    """Files of a manifest (``.jsonl``) or media files under a folder, sorted."""
    data = Path(data)
    if data.is_dir():
        return sorted(path for path in data.rglob("*") if is_media_path(path) and path.is_file())
    if data.is_file():
        return [record.path for record in read_manifest(data)]
    raise FileNotFoundError(f"no manifest or folder at {data}")


def iter_clips(
    paths: list[Path], *, size: int | None, num_frames: int | None, skips: SkipCounter
) -> Iterator[tuple[Path, torch.Tensor]]:
    """``(path, video (1, 3, T, H, W))`` for every readable file; others are counted.

    Clips are centre-cropped to ``size x size`` and cut to their first
    ``num_frames`` frames (shorter clips are used whole).
    """
    for index, path in enumerate(paths):
        try:
            frames = read_video(path, size=None if size is None else (size, size))
        except VideoDecodeError as error:
            skips.add(SkippedSample(index, str(path), error.reason, str(error)))
            continue
        if num_frames is not None:
            frames = frames[:num_frames]
        yield path, frames_to_tensor(frames)[None]
