"""Build manifests from folders of media, and inspect manifests.

``index_folder`` walks a folder for videos and images, takes each caption from a
sidecar ``<name>.txt`` (UTF-8) or from a ``captions.csv`` (columns ``path`` and
``caption``) at the folder's top, probes duration, frame rate and size, and
returns manifest records plus a list of files it had to skip, each with a
reason. ``inspect_manifest`` summarises a manifest and lists unreadable files.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from moviegen.data.manifest import ClipRecord, read_manifest
from moviegen.data.video_io import VideoDecodeError, is_media_path, probe_video

__all__ = ["CAPTIONS_CSV", "IndexResult", "ManifestReport", "index_folder", "inspect_manifest"]

CAPTIONS_CSV = "captions.csv"
# Histogram bin edges for clip durations, in seconds.
DURATION_BINS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str
    message: str


@dataclass
class IndexResult:
    records: list[ClipRecord]
    skipped: list[SkippedFile]

    def skip_counts(self) -> Counter:
        return Counter(item.reason for item in self.skipped)


class CaptionError(ValueError):
    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def _read_captions_csv(root: Path) -> dict[str, str]:
    """``captions.csv`` as {relative posix path: caption}, or {} if absent."""
    csv_path = root / CAPTIONS_CSV
    if not csv_path.is_file():
        return {}
    try:
        with csv_path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or ())
            path_column = "path" if "path" in columns else "file"
            if path_column not in columns or "caption" not in columns:
                raise ValueError(
                    f"{csv_path}: needs a header with 'path' (or 'file') and 'caption' columns, "
                    f"got {sorted(columns)}"
                )
            return {
                Path(row[path_column]).as_posix(): row["caption"].strip()
                for row in reader
                if row.get(path_column)
            }
    except UnicodeDecodeError as error:
        raise ValueError(f"{csv_path}: not valid UTF-8 ({error.reason})") from error


def _sidecar_caption(media: Path) -> str | None:
    sidecar = media.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    try:
        return sidecar.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as error:
        raise CaptionError(
            "caption_encoding", f"{sidecar}: caption is not valid UTF-8 ({error.reason})"
        ) from error


def index_folder(
    root: str | os.PathLike, *, verify: bool = True, progress: bool = True
) -> IndexResult:
    """Manifest records for every video or image under ``root``.

    Args:
        root: folder to walk (recursively). Hidden files and folders are ignored.
        verify: decode every frame to catch truncated or corrupt files whose
            headers look fine (the default); ``False`` only reads headers.
        progress: show a progress bar.

    Skip reasons: ``no_caption``, ``empty_caption``, ``caption_encoding``, and
    the :class:`VideoDecodeError` reasons (``empty``, ``corrupt``, ...).
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise ValueError(f"not a folder: {root}")
    csv_captions = _read_captions_csv(root)
    candidates = sorted(
        path
        for path in root.rglob("*")
        if is_media_path(path)
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    records: list[ClipRecord] = []
    skipped: list[SkippedFile] = []
    for path in tqdm(candidates, desc="index", unit="file", disable=not progress):
        relative = path.relative_to(root).as_posix()
        try:
            caption = csv_captions.get(relative)
            if caption is None:
                caption = _sidecar_caption(path)
            if caption is None:
                raise CaptionError("no_caption", f"no {path.stem}.txt and not in {CAPTIONS_CSV}")
            if not caption:
                raise CaptionError("empty_caption", "caption is empty")
            info = probe_video(path, verify=verify)
        except CaptionError as error:
            skipped.append(SkippedFile(relative, error.reason, str(error)))
            continue
        except VideoDecodeError as error:
            skipped.append(SkippedFile(relative, error.reason, str(error)))
            continue
        records.append(
            ClipRecord(
                path=path,
                caption=caption,
                fps=round(info.fps, 6),
                num_frames=info.num_frames,
                width=info.width,
                height=info.height,
                duration=round(info.duration, 6),
            )
        )
    return IndexResult(records=records, skipped=skipped)


@dataclass
class ManifestReport:
    """What ``moviegen data inspect`` prints."""

    manifest: str
    num_records: int = 0
    num_images: int = 0
    num_videos: int = 0
    total_duration: float = 0.0
    duration_histogram: dict[str, int] = field(default_factory=dict)
    resolutions: dict[str, int] = field(default_factory=dict)
    frame_rates: dict[str, int] = field(default_factory=dict)
    caption_words: dict[str, float] = field(default_factory=dict)
    unreadable: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def format(self) -> str:
        lines = [
            f"manifest: {self.manifest}",
            f"clips: {self.num_records} ({self.num_videos} videos, {self.num_images} images), "
            f"{self.total_duration:.1f} s of video",
            "",
        ]
        for title, table in (
            ("duration (s)", self.duration_histogram),
            ("resolution (WxH)", self.resolutions),
            ("fps", self.frame_rates),
        ):
            lines.append(title)
            width = max(table.values(), default=1)
            for key, count in table.items():
                bar = "#" * max(1 if count else 0, round(HISTOGRAM_BAR * count / width))
                lines.append(f"  {key:>14}  {count:6d}  {bar}")
            lines.append("")
        if self.caption_words:
            words = self.caption_words
            lines.append(
                f"caption words: min {words['min']:.0f}, mean {words['mean']:.1f}, "
                f"max {words['max']:.0f}"
            )
        lines.append(f"unreadable: {len(self.unreadable)}")
        for item in self.unreadable:
            lines.append(f"  {item['path']}: {item['reason']}")
        return "\n".join(lines)


# Width in characters of the longest histogram bar.
HISTOGRAM_BAR = 40


def _duration_bin(seconds: float) -> str:
    for low, high in itertools.pairwise(DURATION_BINS):
        if seconds < high:
            return f"[{low:g}, {high:g})"
    return f">= {DURATION_BINS[-1]:g}"


def inspect_manifest(
    path: str | os.PathLike, *, verify: bool = True, progress: bool = True
) -> ManifestReport:
    """Counts, histograms and unreadable files of a manifest.

    Every file is probed (``verify`` also decodes it fully), so the facts come
    from the files themselves, not from what the manifest claims.
    """
    records = read_manifest(path)
    report = ManifestReport(manifest=str(path), num_records=len(records))
    durations: Counter = Counter()
    resolutions: Counter = Counter()
    rates: Counter = Counter()
    words = [len(record.caption.split()) for record in records]
    for record in tqdm(records, desc="inspect", unit="clip", disable=not progress):
        try:
            info = probe_video(record.path, verify=verify)
        except VideoDecodeError as error:
            report.unreadable.append(
                {"path": str(record.path), "reason": error.reason, "message": str(error)}
            )
            continue
        if info.is_image:
            report.num_images += 1
        else:
            report.num_videos += 1
            report.total_duration += info.duration
            durations[_duration_bin(info.duration)] += 1
            rates[f"{info.fps:.3g}"] += 1
        resolutions[f"{info.width}x{info.height}"] += 1
    order = {_duration_bin(edge): rank for rank, edge in enumerate(DURATION_BINS)}
    report.duration_histogram = dict(
        sorted(durations.items(), key=lambda kv: order.get(kv[0], len(order)))
    )
    report.resolutions = dict(resolutions.most_common())
    report.frame_rates = dict(rates.most_common())
    if words:
        report.caption_words = {
            "min": float(min(words)),
            "mean": sum(words) / len(words),
            "max": float(max(words)),
        }
    return report
