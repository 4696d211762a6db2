"""Prompt adherence on the shapes dataset: `moviegen eval shapes`.

A generated video is read back into the four attributes its caption names
(``specs/shapes.md``, "Scoring a generated video") and compared with them.

Per frame:

1. background: the median colour of the one-pixel border;
2. foreground: pixels whose RGB distance from the background exceeds
   :data:`FOREGROUND_DISTANCE`, kept to the largest 8-connected blob so that
   specks elsewhere cannot move the centroid or stretch the box;
3. colour and full coverage: the median colour and the median distance of the
   blob's interior (pixels whose 8 neighbours are all in the blob, so fully
   covered; a blob too thin to have one uses its brighter half instead);
4. coverage: each blob pixel weighs ``distance / full``, so an anti-aliased or
   blurred edge pixel counts for the part of it the object covers and the
   area (sum of weights) and centroid stay nearly exact for objects only a
   few pixels wide; noise is left in (not clipped) so that it averages out;
5. box: width and height are the sums over columns (rows) of the largest
   coverage, clipped to 1, in each: a half-covered edge column adds half a
   pixel.

Per video: the medians of the per-frame colour, fill ratio
``area / (width * height)`` and area, then the nearest palette colour; the
shape whose fill ratio band holds the measured one (:data:`CIRCLE_MIN_FILL`,
:data:`SQUARE_MIN_FILL`); the size whose expected area for that shape is
nearest in log ratio; and the direction of the centroid's displacement between
the first and the last frames (:data:`NUM_END_FRAMES`,
:data:`MIN_TRAVEL_FRACTION`).

A reading's attribute is ``None`` when it cannot be decided (no foreground in
any frame, or too little motion for a direction); ``None`` never matches.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
from tqdm import tqdm

from moviegen.data.shapes import (
    PALETTE,
    SIZE_FRACTIONS,
    TRIANGLE_HEIGHT_RATIO,
    ShapeAttributes,
)
from moviegen.data.transforms import strip_fps_prefix
from moviegen.data.video_io import VideoDecodeError, read_video

__all__ = [
    "ATTRIBUTE_NAMES",
    "CIRCLE_MIN_FILL",
    "FOREGROUND_DISTANCE",
    "MIN_TRAVEL_FRACTION",
    "NUM_END_FRAMES",
    "PROMPTS_FILE",
    "SQUARE_MIN_FILL",
    "PromptRecord",
    "ShapeReading",
    "ShapesScore",
    "analyse_video",
    "expected_area_fraction",
    "read_prompts",
    "score_samples",
    "score_video",
]

ATTRIBUTE_NAMES: tuple[str, ...] = ("colour", "shape", "size", "direction")
# The sample folder's index: one JSON object per line with "path" (relative to
# the folder), "prompt" (the caption, possibly "FPS-8 "-prefixed) and "seed".
PROMPTS_FILE = "prompts.jsonl"

# Euclidean RGB distance (0-255 scale) from the background above which a pixel
# may belong to the object. Every palette colour is 200+ away from black, so
# edge pixels covered more than about a third pass, while Gaussian noise of std
# 10 per channel (a distance of about 16 on average) stays far below it.
FOREGROUND_DISTANCE = 60.0
# Fallback for blobs without an interior: pixels at least this fraction of the
# blob's largest distance stand in for it (half excludes the dim anti-aliased rim).
CORE_FRACTION = 0.5
# Nominal fill ratios of the shapes inside their bounding box (continuous geometry).
NOMINAL_FILL: MappingProxyType[str, float] = MappingProxyType(
    {"triangle": 0.5, "circle": math.pi / 4, "square": 1.0}
)
# Decision boundaries on the measured fill ratio. Circle/square: the midpoint of
# the nominal values. Triangle/circle: above the midpoint (0.64), because pixels
# only ever shorten a triangle's box (its 60-degree corners and apex cover
# little of their pixels, and blur erodes them further), never a circle's much.
# Measured on the generator's clips: triangles 0.51-0.68 (0.68 only at 32 px,
# 6 px wide), up to 0.69 at 64 px after a Gaussian blur of 1 px; circles
# 0.76-0.82 and squares 0.89-1.0 with noise up to std 20 or that blur.
CIRCLE_MIN_FILL = 0.72
SQUARE_MIN_FILL = (NOMINAL_FILL["circle"] + NOMINAL_FILL["square"]) / 2
# The spec's minimum motion for a direction, as a fraction of the canvas side
# along the motion's axis (a correct clip moves 0.5).
MIN_TRAVEL_FRACTION = 0.15
# Centroids are compared between the median of the first and the median of the
# last few frames that show an object, so that one bad frame at either end does
# not flip the direction; at most half the frames go to each end. With the
# spec's 16 frames the measured travel is 13/15 of the true one.
NUM_END_FRAMES = 3

# 8-connectivity: the offsets of a pixel's neighbours, as (row, column).
_NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = (
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, -1),
    (0, 1),
    (1, -1),
    (1, 0),
    (1, 1),
)


def expected_area_fraction(shape: str, size: str) -> float:
    """Area of ``shape`` at ``size`` as a fraction of the canvas (``specs/shapes.md``).

    The bounding-box width is ``SIZE_FRACTIONS[size]`` of the side; a triangle
    is equilateral (height ``sqrt(3) / 2`` of its width).
    """
    width = SIZE_FRACTIONS[size]
    height = width * TRIANGLE_HEIGHT_RATIO if shape == "triangle" else width
    return NOMINAL_FILL[shape] * width * height


# ----------------------------------------------------------------------------- reading one video


@dataclass(frozen=True)
class ShapeReading:
    """What :func:`analyse_video` saw. Attribute fields are ``None`` when undecidable.

    Measurements are medians over the frames that show an object
    (``num_foreground_frames`` of ``num_frames``) and ``None`` when none does.
    """

    colour: str | None
    shape: str | None
    size: str | None
    direction: str | None
    num_frames: int
    num_foreground_frames: int
    background_rgb: tuple[float, float, float]  # median over frames of the border medians
    foreground_rgb: tuple[float, float, float] | None  # median colour of the object's core
    colour_distance: float | None  # RGB distance from foreground_rgb to the chosen palette entry
    fill_ratio: float | None  # area / (box width * box height)
    area_fraction: float | None  # object area over canvas area
    displacement: tuple[float, float] | None  # centroid (dx, dy) in pixels, last minus first
    travel_fraction: float | None  # |displacement| on its major axis over that canvas side

    def attributes(self) -> dict[str, str | None]:
        """The four predicted attributes, keyed by :data:`ATTRIBUTE_NAMES`."""
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES}

    def to_dict(self) -> dict:
        return asdict(self)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"frames must be uint8 (T, H, W, 3), got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be (T, H, W, 3) with T, H, W > 0, got {frames.shape}")
    return frames


def _border_median(frames: np.ndarray) -> np.ndarray:
    """Per-frame median colour of the one-pixel border: ``(T, H, W, 3)`` -> ``(T, 3)``."""
    border = np.concatenate(
        [frames[:, 0], frames[:, -1], frames[:, 1:-1, 0], frames[:, 1:-1, -1]], axis=1
    )  # (T, 2W + 2(H - 2), 3)
    return np.median(border, axis=1)


def _shift(array: np.ndarray, d_row: int, d_col: int, fill) -> np.ndarray:
    """``out[..., r, c] = array[..., r + d_row, c + d_col]``, ``fill`` outside the frame."""
    out = np.full_like(array, fill)
    height, width = array.shape[-2:]
    dst_rows = slice(max(0, -d_row), height - max(0, d_row))
    dst_cols = slice(max(0, -d_col), width - max(0, d_col))
    src_rows = slice(max(0, d_row), height - max(0, -d_row))
    src_cols = slice(max(0, d_col), width - max(0, -d_col))
    out[..., dst_rows, dst_cols] = array[..., src_rows, src_cols]
    return out


def _largest_components(mask: np.ndarray) -> np.ndarray:
    """Keep each frame's largest 8-connected blob: ``(T, H, W)`` bool -> same.

    Plain numpy: every pixel starts labelled with its own flat index, then
    repeatedly takes the smallest label among its neighbours and follows
    labels to their own labels (pointer jumping), which converges in a number
    of rounds that grows with the logarithm of a blob's diameter, not linearly.
    """
    num_frames = mask.shape[0]
    none = mask.size  # larger than every real label
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), none)
    while True:
        smallest = labels
        for d_row, d_col in _NEIGHBOUR_OFFSETS:
            smallest = np.minimum(smallest, _shift(labels, d_row, d_col, none))
        smallest = np.where(mask, smallest, none)
        flat = np.append(smallest.reshape(-1), none)  # index `none` maps to itself
        while True:
            jumped = flat[flat]
            if np.array_equal(jumped, flat):
                break
            flat = jumped
        updated = flat[:-1].reshape(mask.shape)
        if np.array_equal(updated, labels):
            break
        labels = updated
    counts = np.bincount(labels[mask], minlength=mask.size)  # pixels per label
    per_frame = counts.reshape(num_frames, -1)  # labels are flat indices inside their frame
    largest = per_frame.argmax(axis=1) + np.arange(num_frames) * per_frame.shape[1]  # (T,)
    has_blob = per_frame.max(axis=1) > 0
    keep = labels == largest[:, None, None]
    return keep & has_blob[:, None, None]


@dataclass(frozen=True)
class _FrameMeasure:
    colour: np.ndarray  # (3,) median RGB of the core
    area: float  # pixels (sum of coverage)
    width: float  # pixels
    height: float  # pixels
    centroid: np.ndarray  # (2,) as (x, y) = (column, row)


def _measure_frame(
    frame: np.ndarray,
    distance: np.ndarray,
    blob: np.ndarray,
    interior: np.ndarray,
    origin: np.ndarray,
) -> _FrameMeasure:
    """Measure one frame's object (module docstring, steps 3-5).

    ``frame`` is ``(h, w, 3)`` float, ``distance``, ``blob`` and ``interior`` are
    ``(h, w)``; ``origin`` is the window's ``(x, y)`` in the full frame.
    """
    core = interior
    if not core.any():  # too thin to have an interior: fall back to the bright part
        core = blob & (distance >= CORE_FRACTION * distance[blob].max())
    peak = float(np.median(distance[core]))
    weight = np.where(blob, distance / peak, 0.0)  # (h, w) coverage, noise kept
    alpha = np.minimum(weight, 1.0)
    area = float(weight.sum())
    rows, cols = np.indices(weight.shape)
    centroid = origin + np.array([(weight * cols).sum(), (weight * rows).sum()]) / area
    return _FrameMeasure(
        colour=np.median(frame[core], axis=0),
        area=area,
        width=float(alpha.max(axis=0).sum()),
        height=float(alpha.max(axis=1).sum()),
        centroid=centroid,
    )


def _classify_shape(fill_ratio: float) -> str:
    if fill_ratio >= SQUARE_MIN_FILL:
        return "square"
    if fill_ratio >= CIRCLE_MIN_FILL:
        return "circle"
    return "triangle"


def _classify_size(shape: str, area_fraction: float) -> str:
    """The size whose expected area for ``shape`` is nearest in log ratio."""
    return min(
        SIZE_FRACTIONS,
        key=lambda size: abs(math.log(area_fraction / expected_area_fraction(shape, size))),
    )


def _nearest_colour(rgb: np.ndarray) -> tuple[str, float]:
    distances = {
        name: float(np.linalg.norm(rgb - np.asarray(value, dtype=np.float64)))
        for name, value in PALETTE.items()
    }
    name = min(distances, key=distances.__getitem__)
    return name, distances[name]


def _direction(
    centroids: np.ndarray, height: int, width: int
) -> tuple[str | None, tuple[float, float] | None, float | None]:
    """Direction, displacement and travel fraction from ``(N, 2)`` centroids in time order."""
    num_ends = min(NUM_END_FRAMES, len(centroids) // 2)
    if num_ends == 0:
        return None, None, None
    first = np.median(centroids[:num_ends], axis=0)
    last = np.median(centroids[-num_ends:], axis=0)
    dx, dy = (float(value) for value in last - first)
    if abs(dx) >= abs(dy):
        travel, name = abs(dx) / width, ("right" if dx > 0 else "left")
    else:
        travel, name = abs(dy) / height, ("down" if dy > 0 else "up")
    return (name if travel >= MIN_TRAVEL_FRACTION else None), (dx, dy), travel


def analyse_video(frames: np.ndarray) -> ShapeReading:
    """Read colour, shape, size and direction back from a shapes video.

    Args:
        frames: ``uint8`` ``(T, H, W, 3)`` RGB.

    Returns:
        A :class:`ShapeReading` with the predicted attributes (``None`` where
        undecidable) and the measurements behind them (module docstring).

    Raises:
        TypeError, ValueError: ``frames`` is not a ``uint8`` ``(T, H, W, 3)`` array.
    """
    frames = _check_frames(frames)
    num_frames, height, width, _ = frames.shape
    pixels = frames.astype(np.float32)  # (T, H, W, 3)
    background = _border_median(pixels)  # (T, 3)
    offset = pixels - background[:, None, None, :]
    distance = np.sqrt(np.einsum("thwc,thwc->thw", offset, offset))  # (T, H, W)
    candidate = distance > FOREGROUND_DISTANCE
    measures = []
    if candidate.any():
        # Work inside the box holding every candidate pixel of every frame: the
        # object's path rather than the whole canvas (nothing outside can be in
        # a blob, so the blobs and their interiors are the same).
        rows = np.flatnonzero(candidate.any(axis=(0, 2)))
        cols = np.flatnonzero(candidate.any(axis=(0, 1)))
        top, left = int(rows[0]), int(cols[0])
        window = (slice(None), slice(top, rows[-1] + 1), slice(left, cols[-1] + 1))
        distance, pixels = distance[window], pixels[window]  # (T, h, w), (T, h, w, 3)
        blobs = _largest_components(candidate[window])  # (T, h, w)
        interiors = blobs.copy()
        for d_row, d_col in _NEIGHBOUR_OFFSETS:
            interiors &= _shift(blobs, d_row, d_col, False)
        origin = np.array([left, top], dtype=np.float64)
        measures = [
            _measure_frame(pixels[t], distance[t], blobs[t], interiors[t], origin)
            for t in range(num_frames)
            if blobs[t].any()
        ]
    background_rgb = tuple(float(v) for v in np.median(background, axis=0))
    if not measures:
        return ShapeReading(
            colour=None,
            shape=None,
            size=None,
            direction=None,
            num_frames=num_frames,
            num_foreground_frames=0,
            background_rgb=background_rgb,
            foreground_rgb=None,
            colour_distance=None,
            fill_ratio=None,
            area_fraction=None,
            displacement=None,
            travel_fraction=None,
        )
    foreground = np.median(np.stack([m.colour for m in measures]), axis=0)  # (3,)
    colour, colour_distance = _nearest_colour(foreground)
    fill_ratio = float(np.median([m.area / (m.width * m.height) for m in measures]))
    area_fraction = float(np.median([m.area for m in measures])) / (height * width)
    shape = _classify_shape(fill_ratio)
    direction, displacement, travel = _direction(
        np.stack([m.centroid for m in measures]), height, width
    )
    return ShapeReading(
        colour=colour,
        shape=shape,
        size=_classify_size(shape, area_fraction),
        direction=direction,
        num_frames=num_frames,
        num_foreground_frames=len(measures),
        background_rgb=background_rgb,
        foreground_rgb=tuple(float(v) for v in foreground),
        colour_distance=colour_distance,
        fill_ratio=fill_ratio,
        area_fraction=area_fraction,
        displacement=displacement,
        travel_fraction=travel,
    )


def _compare(reading: ShapeReading, expected: ShapeAttributes) -> dict[str, bool]:
    correct = {name: getattr(reading, name) == getattr(expected, name) for name in ATTRIBUTE_NAMES}
    correct["all_correct"] = all(correct.values())
    return correct


def score_video(frames: np.ndarray, expected: ShapeAttributes) -> dict[str, bool]:
    """Whether ``frames`` show ``expected``: ``{colour, shape, size, direction, all_correct}``.

    An undecidable attribute (``None`` in the reading) counts as wrong.
    """
    if not isinstance(expected, ShapeAttributes):
        raise TypeError(f"expected must be ShapeAttributes, got {type(expected).__name__}")
    return _compare(analyse_video(frames), expected)


# ----------------------------------------------------------------------------- a folder of samples


@dataclass(frozen=True)
class PromptRecord:
    """One line of ``prompts.jsonl``; ``path`` is resolved against the folder."""

    line: int
    path: Path
    prompt: str
    seed: int | None


def read_prompts(samples_dir: str | os.PathLike) -> list[PromptRecord]:
    """Parse ``samples_dir/prompts.jsonl``; blank lines are ignored, keys other
    than ``path``, ``prompt`` and ``seed`` (optional) are allowed and ignored.

    Raises:
        FileNotFoundError: the folder has no ``prompts.jsonl``.
        ValueError: a line is not a JSON object with a string ``path`` and
            ``prompt`` and an integer ``seed``; the message names the line.
    """
    index = Path(samples_dir) / PROMPTS_FILE
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no such file (a samples folder needs {PROMPTS_FILE})")
    records = []
    with index.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            where = f"{index}, line {number}"
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
            if not isinstance(data, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
            for key in ("path", "prompt"):
                if not isinstance(data.get(key), str) or not data[key]:
                    raise ValueError(f"{where}: {key!r} must be a non-empty string")
            seed = data.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise ValueError(f"{where}: 'seed' must be an integer, got {seed!r}")
            path = Path(samples_dir) / data["path"]
            records.append(PromptRecord(line=number, path=path, prompt=data["prompt"], seed=seed))
    return records


def _rate(hits: int, total: int) -> float:
    return hits / total if total else float("nan")


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass
class ShapesScore:
    """Prompt adherence over a folder of samples (:func:`score_samples`).

    Rates are over the ``num_videos`` scored videos (``nan`` when there are
    none). Videos that could not be read (``skipped``) and prompts that are not
    canonical shapes captions (``non_canonical``) are listed, not scored.
    """

    num_videos: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)  # per attribute
    all_correct_rate: float = float("nan")
    rows: list[dict] = field(default_factory=list)  # one per scored video
    skipped: list[dict] = field(default_factory=list)  # path, prompt, reason
    non_canonical: list[dict] = field(default_factory=list)  # path, prompt

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def num_non_canonical(self) -> int:
        return len(self.non_canonical)

    def to_dict(self) -> dict:
        """JSON-ready (rates with no videos are ``null``)."""
        return {
            "num_videos": self.num_videos,
            "accuracy": {name: _json_number(value) for name, value in self.accuracy.items()},
            "all_correct_rate": _json_number(self.all_correct_rate),
            "num_skipped": self.num_skipped,
            "num_non_canonical": self.num_non_canonical,
            "rows": self.rows,
            "skipped": self.skipped,
            "non_canonical": self.non_canonical,
        }

    def format_table(self, *, per_video: bool = True) -> str:
        """A plain-text report: one line per video (``per_video``), then the rates."""

        def mark(ok: bool) -> str:
            return "ok" if ok else "--"

        def percent(value: float) -> str:
            return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"

        lines = []
        if per_video and self.rows:

            def words(attributes: dict) -> str:
                return " ".join(str(attributes[name]) for name in ATTRIBUTE_NAMES)

            cells = [
                (row["path"], words(row["expected"]), words(row["predicted"]), row["correct"])
                for row in self.rows
            ]
            path_width = max(len(cell[0]) for cell in cells)
            text_width = max(len("expected"), *(len(text) for cell in cells for text in cell[1:3]))
            lines.append(
                f"{'video':<{path_width}}  {'expected':<{text_width}}  "
                f"{'read':<{text_width}}  " + "  ".join(ATTRIBUTE_NAMES)
            )
            for path, expected, read, correct in cells:
                marks = "  ".join(f"{mark(correct[name]):>{len(name)}}" for name in ATTRIBUTE_NAMES)
                lines.append(
                    f"{path:<{path_width}}  {expected:<{text_width}}  {read:<{text_width}}  {marks}"
                )
            lines.append("")
        lines.append(f"videos scored: {self.num_videos}")
        for name in ATTRIBUTE_NAMES:
            lines.append(f"  {name:<12}{percent(self.accuracy.get(name, float('nan'))):>8}")
        lines.append(f"  {'all correct':<12}{percent(self.all_correct_rate):>8}")
        lines.append(f"skipped (unreadable): {self.num_skipped}")
        lines.extend(f"  {item['path']}: {item['reason']}" for item in self.skipped)
        lines.append(f"not canonical shapes captions: {self.num_non_canonical}")
        lines.extend(f"  {item['path']}: {item['prompt']!r}" for item in self.non_canonical)
        return "\n".join(lines)


def score_samples(samples_dir: str | os.PathLike, *, progress: bool = False) -> ShapesScore:
    """Score every video listed in ``samples_dir/prompts.jsonl`` against its prompt.

    A prompt may carry Movie Gen's ``FPS-N`` prefix; what follows must be a
    canonical caption (``a {size} {colour} {shape} moving {direction}``), else the
    entry is listed in ``non_canonical`` and its video is not read. A video
    that cannot be decoded is listed in ``skipped`` with the reason.

    Raises:
        FileNotFoundError: no ``prompts.jsonl``.
        ValueError: a malformed ``prompts.jsonl`` line (the message names it).
    """
    samples_dir = Path(samples_dir)
    records = read_prompts(samples_dir)
    score = ShapesScore()
    for record in tqdm(records, desc="shapes score", unit="video", disable=not progress):
        name = (
            record.path.relative_to(samples_dir).as_posix()
            if record.path.is_relative_to(samples_dir)
            else str(record.path)
        )
        entry = {"path": name, "prompt": record.prompt, "seed": record.seed}
        try:
            expected = ShapeAttributes.from_caption(strip_fps_prefix(record.prompt).strip())
        except ValueError:
            score.non_canonical.append(entry)
            continue
        try:
            frames = read_video(record.path)
        except VideoDecodeError as error:
            score.skipped.append({**entry, "reason": error.reason, "error": str(error)})
            continue
        reading = analyse_video(frames)
        correct = _compare(reading, expected)
        score.rows.append(
            {
                **entry,
                "expected": expected.to_dict(),
                "predicted": reading.attributes(),
                "correct": {name: correct[name] for name in ATTRIBUTE_NAMES},
                "all_correct": correct["all_correct"],
                "reading": reading.to_dict(),
            }
        )
    score.num_videos = len(score.rows)
    score.accuracy = {
        name: _rate(sum(row["correct"][name] for row in score.rows), score.num_videos)
        for name in ATTRIBUTE_NAMES
    }
    score.all_correct_rate = _rate(sum(row["all_correct"] for row in score.rows), score.num_videos)
    return score
