"""The video-text dataset: manifest entries -> clips ``(C, T, H, W)`` in ``[-1, 1]``.

A sample is requested either by index (the dataset's default clip shape) or by
``(index, (num_frames, height, width))``, which is what
:class:`moviegen.data.buckets.BucketBatchSampler` yields, so one dataset serves
every bucket. Images are one-frame clips, and a one-frame request on a video
takes a single frame from it.

A sample that cannot be read (missing, corrupt, truncated, too short) comes back
as a :class:`SkippedSample` instead of raising, so one bad file never stops an
epoch; :func:`collate_clips` drops such samples from the batch and lists them,
and :class:`SkipCounter` tallies them by reason for the logs.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moviegen.data.buckets import BucketBatchSampler, BucketKey, BucketSpec
from moviegen.data.manifest import ClipRecord, read_manifest
from moviegen.data.transforms import add_fps_prefix, frames_to_tensor
from moviegen.data.video_io import (
    VideoDecodeError,
    VideoInfo,
    VideoTooShortError,
    is_image_path,
    probe_video,
    read_video,
    resample_indices,
)

__all__ = [
    "SkipCounter",
    "SkippedSample",
    "VideoTextDataset",
    "build_loader",
    "collate_clips",
]

# How many example paths a SkipCounter keeps per reason for its report.
_MAX_EXAMPLES_PER_REASON = 5
# The decoded-clip cache keeps a video whole when its source frames (uint8 RGB
# at the source size) take at most this share of the cache: windows and single
# frames are then cut from memory, however they move between epochs. Longer
# videos are cached one decoded window at a time.
_WHOLE_CLIP_SHARE = 1 / 16


@dataclass(frozen=True)
class SkippedSample:
    """A sample that could not be produced, and why."""

    index: int
    path: str
    reason: str
    message: str


@dataclass
class SkipCounter:
    """Counts skipped samples by reason and keeps a few example paths of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, skipped: SkippedSample) -> None:
        self.counts[skipped.reason] += 1
        examples = self.examples.setdefault(skipped.reason, [])
        if len(examples) < _MAX_EXAMPLES_PER_REASON and skipped.path not in examples:
            examples.append(skipped.path)

    def update(self, skipped: Sequence[SkippedSample]) -> None:
        for item in skipped:
            self.add(item)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per reason, e.g. ``too_short: 3 (clips/a.mp4, ...)``."""
        if not self.counts:
            return "no samples skipped"
        lines = [f"{self.total} samples skipped:"]
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason}: {count} ({', '.join(self.examples.get(reason, []))})")
        return "\n".join(lines)


class VideoTextDataset(Dataset):
    """Clips and captions from a manifest.

    Args:
        records: a manifest path or parsed :class:`ClipRecord` list.
        num_frames: frames per clip for integer indexing (bucketed requests
            carry their own).
        size: output ``(H, W)`` for integer indexing.
        fps: frame rate clips are sampled at (frames are picked, not blended);
            ``None`` keeps each file's own rate.
        crop: scale to cover the size and centre-crop (default), or stretch.
        fps_prefix: prepend ``FPS-N`` to captions (Movie Gen's fps conditioning),
            with N the sampling rate.
        random_start: pick the window start at random (seeded by ``seed``, the
            epoch and the index); otherwise take the first frames.
        seed: seed of the window starts.
        cache_mib: keep decoded frames (uint8) in memory up to this many MiB,
            least recently used first out; 0 decodes every request. Short
            videos are kept whole (every window and single frame of a later
            epoch comes from memory), long ones one window at a time. Worth it
            when the decoded training set fits in memory (the demo's 922 shapes
            clips take 181 MiB) and decoding is a sizeable share of a step.
    """

    def __init__(
        self,
        records: str | os.PathLike | Sequence[ClipRecord],
        *,
        num_frames: int = 16,
        size: tuple[int, int] = (64, 64),
        fps: float | None = None,
        crop: bool = True,
        fps_prefix: bool = False,
        random_start: bool = True,
        seed: int = 0,
        cache_mib: float = 0.0,
    ):
        if isinstance(records, str | os.PathLike):
            records = read_manifest(records)
        if num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"size must be (H, W) with positive entries, got {size}")
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if cache_mib < 0:
            raise ValueError(f"cache_mib must be >= 0, got {cache_mib}")
        self.records = list(records)
        self.num_frames = num_frames
        self.size = tuple(size)
        self.fps = fps
        self.crop = crop
        self.fps_prefix = fps_prefix
        self.random_start = random_start
        self.seed = seed
        self.epoch = 0
        self.cache_bytes = int(cache_mib * 2**20)
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Change the random window starts (call before each epoch's loader)."""
        self.epoch = epoch

    # ------------------------------------------------------------------ metadata

    def _info(self, record: ClipRecord) -> VideoInfo:
        """Clip facts from the manifest, probing the file only when they are missing."""
        if record.num_frames and record.fps and record.width and record.height:
            return VideoInfo(
                path=str(record.path),
                num_frames=record.num_frames,
                fps=record.fps,
                width=record.width,
                height=record.height,
                duration=record.num_frames / record.fps,
                codec="manifest",
                is_image=is_image_path(record.path),
            )
        return probe_video(record.path)

    def _window(self, record: ClipRecord, info: VideoInfo) -> tuple[int, int]:
        """Usable source frame range ``[first, stop)`` from the record's start/end."""
        first = round((record.start or 0.0) * info.fps)
        stop = info.num_frames
        if record.end is not None:
            stop = min(stop, round(record.end * info.fps))
        return first, stop

    def available_frames(self, index: int, fps: float | None = None) -> int:
        """Frames a clip yields at ``fps`` (or the dataset's rate) within its window."""
        record = self.records[index]
        info = self._info(record)
        if info.is_image:
            return 1
        first, stop = self._window(record, info)
        span = stop - first
        step = info.fps / (fps or self.fps or info.fps)
        return 0 if span <= 0 else int((span - 1) / step + 1e-6) + 1

    def bucket_keys(self, spec: BucketSpec) -> list[BucketKey | None]:
        """The bucket of every sample (``None``: unreadable or too short for any)."""
        keys: list[BucketKey | None] = []
        for index, record in enumerate(self.records):
            try:
                info = self._info(record)
                frames = self.available_frames(index)
            except VideoDecodeError:
                keys.append(None)
                continue
            keys.append(spec.assign(info.width, info.height, frames, info.is_image))
        return keys

    # ------------------------------------------------------------------ reading

    def __getitem__(self, item: int | tuple[int, BucketKey]) -> dict | SkippedSample:
        if isinstance(item, tuple):
            index, (num_frames, height, width) = item
        else:
            index, num_frames, (height, width) = item, self.num_frames, self.size
        record = self.records[index]
        try:
            return self._load(index, record, num_frames, (height, width))
        except VideoDecodeError as error:
            return SkippedSample(index, str(record.path), error.reason, str(error))

    def _load(self, index: int, record: ClipRecord, num_frames: int, size: tuple[int, int]) -> dict:
        info = self._info(record)
        caption = record.caption
        if not caption.strip():
            raise VideoDecodeError(record.path, "empty caption", reason="empty_caption")
        fps = self.fps or info.fps
        if info.is_image:
            if num_frames != 1:
                raise VideoDecodeError(
                    record.path, f"an image cannot give {num_frames} frames", reason="too_short"
                )
            frames = self._read(index, info, size=size, crop=self.crop)
        else:
            first, stop = self._window(record, info)
            step = info.fps / fps
            span = int((num_frames - 1) * step + 1e-6) + 1  # source frames covered
            slack = stop - first - span
            if slack < 0:
                raise VideoDecodeError(
                    record.path,
                    f"needs {span} source frames for {num_frames} at {fps:g} fps, "
                    f"has {max(stop - first, 0)}",
                    reason="too_short",
                )
            offset = 0
            if self.random_start and slack > 0:
                rng = np.random.default_rng((self.seed, self.epoch, index))
                offset = int(rng.integers(0, slack + 1))
            frames = self._read(
                index,
                info,
                start_frame=first + offset,
                num_frames=num_frames,
                fps=None if self.fps is None else fps,
                size=size,
                crop=self.crop,
            )
        if self.fps_prefix:
            caption = add_fps_prefix(caption, fps)
        return {
            "video": frames_to_tensor(frames),  # (3, T, H, W)
            "caption": caption,
            "index": index,
            "path": str(record.path),
        }

    def _read(self, index: int, info: VideoInfo, **window) -> np.ndarray:
        """``read_video(info.path, **window)``, through the decoded-frame cache when on."""
        if not self.cache_bytes:
            return read_video(info.path, **window)
        source_bytes = info.num_frames * info.width * info.height * 3
        whole = 0 < source_bytes <= self.cache_bytes * _WHOLE_CLIP_SHARE  # 0: length unknown
        if info.is_image or not whole:
            key = (index, *sorted(window.items()))
            return self._cached(key, lambda: read_video(info.path, **window))
        size, crop = window["size"], window["crop"]
        clip = self._cached(
            (index, "whole", size, crop), lambda: read_video(info.path, size=size, crop=crop)
        )
        wanted = resample_indices(
            window["num_frames"],
            src_fps=info.fps,
            dst_fps=window.get("fps"),
            start=window["start_frame"],
        )
        if wanted[-1] >= len(clip):
            raise VideoTooShortError(
                info.path,
                f"asked for source frames {wanted[0]}-{wanted[-1]}, but {len(clip)} decode",
                num_available=len(clip),
            )
        return clip[wanted]

    def _cached(self, key: tuple, decode) -> np.ndarray:
        """The frames under ``key``, decoded by ``decode()`` on a miss and kept
        when they fit the cap (least recently used out first)."""
        frames = self._cache.get(key)
        if frames is not None:
            self._cache.move_to_end(key)
            return frames
        frames = decode()
        if frames.nbytes <= self.cache_bytes:
            while self._cached_bytes + frames.nbytes > self.cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes
            self._cache[key] = frames
            self._cached_bytes += frames.nbytes
        return frames


def collate_clips(items: Sequence[dict | SkippedSample]) -> dict:
    """Stack good samples, list skipped ones.

    Returns a dict with ``video`` ``(B, 3, T, H, W)`` (``None`` when every
    sample was skipped), ``caption`` (list of str), ``index`` ``(B,)`` and
    ``skipped`` (list of :class:`SkippedSample`) for the trainer's SkipCounter.
    """
    good = [item for item in items if not isinstance(item, SkippedSample)]
    skipped = [item for item in items if isinstance(item, SkippedSample)]
    shapes = {tuple(item["video"].shape) for item in good}
    if len(shapes) > 1:
        raise ValueError(
            f"samples in one batch have different shapes {sorted(shapes)}; "
            "batch with BucketBatchSampler so that every batch comes from one bucket"
        )
    return {
        "video": torch.stack([item["video"] for item in good]) if good else None,
        "caption": [item["caption"] for item in good],
        "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "path": [item["path"] for item in good],
        "skipped": skipped,
    }


def build_loader(
    dataset: VideoTextDataset,
    spec: BucketSpec,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    image_fraction: float | None = None,
    video_frames_as_images: bool = False,
    drop_last: bool = False,
) -> tuple[DataLoader, BucketBatchSampler]:
    """A bucketed DataLoader over ``dataset`` and the sampler that drives it.

    The sampler is returned too because its ``state_dict`` is what a trainer
    saves to resume mid-epoch. Unusable samples (unreadable, too short for every
    bucket) are counted by the sampler as ``num_unassigned``.
    """
    sampler = BucketBatchSampler(
        dataset.bucket_keys(spec),
        spec,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        image_fraction=image_fraction,
        video_frames_as_images=video_frames_as_images,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_clips,
        persistent_workers=False,
    )
    return loader, sampler
