"""The built-in synthetic "shapes" text-to-video dataset.

Every clip shows one flat-coloured circle, square or triangle moving in a
straight line on a black background; its caption names the size, colour, kind
and direction. The contract is ``specs/shapes.md``; every number it fixes is a
named constant below, so an evaluator can be written against the same values.

Coordinates: positions are continuous ``(x, y)`` in *pixel-index* units, so
that pixel ``(row r, col c)`` covers ``[c - 0.5, c + 0.5] x [r - 0.5, r + 0.5]``
and its centre is ``(c, r)``. With this choice the coverage-weighted centroid of
a symmetric object's pixel indices equals its centre, which is what an
evaluator measures. ``y`` grows downwards (``up`` means the row index falls).

Determinism: clip ``i`` of a dataset depends only on ``(seed, i)`` and the
render options (never on ``num_clips`` or on other clips), so any clip can be
regenerated alone with :func:`render_dataset_clip`.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from tqdm import tqdm

from moviegen.data.manifest import ClipRecord, write_manifest
from moviegen.data.video_io import write_video

__all__ = [
    "DIRECTIONS",
    "MARGIN_PX",
    "MIN_NUM_FRAMES",
    "MIN_SIZE",
    "NUM_COMBINATIONS",
    "PALETTE",
    "SHAPES",
    "SIZE_FRACTIONS",
    "SUPERSAMPLE",
    "TRAVEL_FRACTION",
    "ShapeAttributes",
    "ShapesDatasetResult",
    "all_attributes",
    "canonical_captions",
    "clip_attributes",
    "clip_rng",
    "generate_shapes_dataset",
    "paraphrase_caption",
    "render_clip",
    "render_dataset_clip",
]

# ----------------------------------------------------------------------------- the contract

# Exact fill colours (specs/shapes.md). Read-only so no caller can change the contract.
PALETTE: MappingProxyType[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (230, 25, 25),
        "green": (25, 200, 25),
        "blue": (40, 60, 230),
        "yellow": (240, 220, 30),
        "magenta": (220, 40, 220),
        "cyan": (30, 210, 220),
    }
)
# Bounding-box width of the object as a fraction of the canvas side.
SIZE_FRACTIONS: MappingProxyType[str, float] = MappingProxyType({"small": 0.20, "large": 0.35})
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# The centre moves this fraction of the canvas side between the first and last frame.
TRAVEL_FRACTION = 0.5
# Pixels at the canvas border that the object never touches, in any frame.
MARGIN_PX = 1
# Smallest canvas the contract supports: below it a large object plus its travel
# and the margins would not fit (0.35 + 0.5 of the side plus 2 px).
MIN_SIZE = 16
# Constant velocity needs a first and a last frame.
MIN_NUM_FRAMES = 2
# Anti-aliasing: each pixel is sampled on a SUPERSAMPLE x SUPERSAMPLE grid, giving
# 64 coverage levels, plenty for 8-bit edges at these object sizes.
SUPERSAMPLE = 8
# Triangle height over bounding-box width (equilateral).
TRIANGLE_HEIGHT_RATIO = math.sqrt(3) / 2

NUM_COMBINATIONS = len(SIZE_FRACTIONS) * len(PALETTE) * len(SHAPES) * len(DIRECTIONS)

# Unit motion vectors in (x, y) image coordinates.
_DIRECTION_VECTORS: MappingProxyType[str, tuple[int, int]] = MappingProxyType(
    {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
)

# Dataset defaults (specs/shapes.md: 64 px, 16 frames at 8 fps).
DEFAULT_SIZE = 64
DEFAULT_NUM_FRAMES = 16
DEFAULT_FPS = 8
DEFAULT_VAL_FRACTION = 0.1
# H.264 quality for the dataset: lower than video_io's default because flat
# colours and hard edges are what the model must learn, and the files are tiny.
DEFAULT_SHAPES_CRF = 15
# Zero-padded clip file names; six digits sort correctly up to a million clips.
_CLIP_NAME_DIGITS = 6

# Domain-separation tags: each random decision draws from its own stream seeded
# by (seed, tag, ...), so turning an option on (e.g. paraphrase) or changing
# num_clips never shifts the random numbers another decision sees.
_PERMUTATION_STREAM = 0
_POSITION_STREAM = 1
_SPLIT_STREAM = 2
_PARAPHRASE_STREAM = 3

_CAPTION_PATTERN = re.compile(
    "a ({}) ({}) ({}) moving ({})".format(
        "|".join(SIZE_FRACTIONS), "|".join(PALETTE), "|".join(SHAPES), "|".join(DIRECTIONS)
    )
)
_CAPTION_GRAMMAR = "a {size} {colour} {shape} moving {direction}"


# ----------------------------------------------------------------------------- attributes and captions


@dataclass(frozen=True)
class ShapeAttributes:
    """The four facts a caption states about a clip."""

    size: str
    colour: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        for name, allowed in (
            ("size", tuple(SIZE_FRACTIONS)),
            ("colour", tuple(PALETTE)),
            ("shape", SHAPES),
            ("direction", DIRECTIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")

    @property
    def caption(self) -> str:
        """The canonical caption, e.g. ``a small red circle moving left``."""
        return _CAPTION_GRAMMAR.format(**self.to_dict())

    def to_dict(self) -> dict[str, str]:
        """``{"size", "colour", "shape", "direction"}`` in that order (the manifest form)."""
        return {
            "size": self.size,
            "colour": self.colour,
            "shape": self.shape,
            "direction": self.direction,
        }

    @classmethod
    def from_caption(cls, caption: str) -> ShapeAttributes:
        """Parse a canonical caption (exact grammar: lower case, single spaces, no period).

        Raises:
            ValueError: ``caption`` is not one of the 144 canonical captions.
        """
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        match = _CAPTION_PATTERN.fullmatch(caption)
        if match is None:
            raise ValueError(
                f"{caption!r} is not a canonical shapes caption; expected "
                f"{_CAPTION_GRAMMAR!r} with size in {tuple(SIZE_FRACTIONS)}, colour in "
                f"{tuple(PALETTE)}, shape in {SHAPES}, direction in {DIRECTIONS}"
            )
        return cls(*match.groups())


def all_attributes() -> list[ShapeAttributes]:
    """All 144 combinations, ordered by size, colour, shape, direction (outermost first)."""
    return [
        ShapeAttributes(*combination)
        for combination in itertools.product(SIZE_FRACTIONS, PALETTE, SHAPES, DIRECTIONS)
    ]


# Immutable (a tuple of frozen dataclasses), so it is a constant, not a cache.
_ALL_ATTRIBUTES: tuple[ShapeAttributes, ...] = tuple(all_attributes())


def canonical_captions() -> list[str]:
    """The 144 canonical captions, in :func:`all_attributes` order."""
    return [attributes.caption for attributes in all_attributes()]


# Paraphrase vocabulary (opt-in robustness training). The canonical word is one
# of the choices, so a paraphrased caption may coincide with the canonical one.
_SIZE_SYNONYMS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
)
_SHAPE_SYNONYMS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {"circle": ("circle", "disc", "ball"), "square": ("square", "box"), "triangle": ("triangle",)}
)
_MOTION_PHRASES: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "left": ("moving left", "moving to the left", "heading left", "going to the left"),
        "right": ("moving right", "moving to the right", "heading right", "going to the right"),
        "up": ("moving up", "moving upwards", "heading up", "rising"),
        "down": ("moving down", "moving downwards", "heading down", "falling"),
    }
)
_ARTICLES = ("a", "one")


def paraphrase_caption(attributes: ShapeAttributes, rng: np.random.Generator) -> str:
    """A random rewording of ``attributes.caption`` (``big`` for ``large``, ``to the left``, ...).

    The colour word is never changed: colour names are the palette's keys and
    the evaluator scores them literally. Deterministic given ``rng``'s state.
    """

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    article = pick(_ARTICLES)
    size = pick(_SIZE_SYNONYMS[attributes.size])
    shape = pick(_SHAPE_SYNONYMS[attributes.shape])
    motion = pick(_MOTION_PHRASES[attributes.direction])
    return f"{article} {size} {attributes.colour} {shape} {motion}"


# ----------------------------------------------------------------------------- rendering


def _half_extents(attributes: ShapeAttributes, size: int) -> tuple[float, float]:
    """Half width and half height of the object's bounding box, in pixels."""
    width = SIZE_FRACTIONS[attributes.size] * size
    height = width * TRIANGLE_HEIGHT_RATIO if attributes.shape == "triangle" else width
    return width / 2, height / 2


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    """Whether points at offset ``(dx, dy)`` from the bounding-box centre lie in the shape."""
    if shape == "circle":
        return dx * dx + dy * dy <= half_w * half_w
    if shape == "square":
        return (np.abs(dx) <= half_w) & (np.abs(dy) <= half_h)
    # Triangle, apex up at dy = -half_h, base at dy = +half_h: the half-width at
    # depth d below the apex is d / sqrt(3) for an equilateral triangle.
    depth = dy + half_h
    return (depth <= 2 * half_h) & (np.abs(dx) * math.sqrt(3) <= depth)


def _pixel_span(centre: float, half: float, size: int) -> tuple[int, int]:
    """First and one-past-last pixel index a ``[centre - half, centre + half]`` span touches."""
    first = max(0, math.floor(centre - half + 0.5))
    stop = min(size, math.floor(centre + half + 0.5) + 1)
    return first, stop


def _draw(frame: np.ndarray, attributes: ShapeAttributes, centre: np.ndarray, size: int) -> None:
    """Paint one anti-aliased object into ``frame`` ``(H, W, 3)`` in place.

    Only the window of pixels the bounding box touches is sampled, so the cost
    is independent of the canvas size.
    """
    half_w, half_h = _half_extents(attributes, size)
    col0, col1 = _pixel_span(float(centre[0]), half_w, size)
    row0, row1 = _pixel_span(float(centre[1]), half_h, size)
    # Sub-sample offsets strictly inside a pixel: (m + 0.5) / k - 0.5.
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    xs = (np.arange(col0, col1)[:, None] + offsets[None, :]).reshape(-1)  # (Wk,)
    ys = (np.arange(row0, row1)[:, None] + offsets[None, :]).reshape(-1)  # (Hk,)
    inside = _inside(
        attributes.shape, xs[None, :] - centre[0], ys[:, None] - centre[1], half_w, half_h
    )  # (Hk, Wk)
    counts = inside.reshape(row1 - row0, SUPERSAMPLE, col1 - col0, SUPERSAMPLE).sum(axis=(1, 3))
    # colour * coverage rounded half up, in integers: a fully covered pixel
    # (count == k * k) is exactly the palette colour, with no float rounding.
    num_samples = SUPERSAMPLE * SUPERSAMPLE
    colour = np.asarray(PALETTE[attributes.colour], dtype=np.int64)
    shaded = (2 * colour * counts[..., None] + num_samples) // (2 * num_samples)  # (h, w, 3)
    frame[row0:row1, col0:col1] = shaded.astype(np.uint8)


def _path(
    attributes: ShapeAttributes, size: int, num_frames: int, rng: np.random.Generator
) -> np.ndarray:
    """Centres ``(T, 2)`` as ``(x, y)``: a random straight path that keeps the margin."""
    half_w, half_h = _half_extents(attributes, size)
    step_x, step_y = _DIRECTION_VECTORS[attributes.direction]
    along_half, across_half = (half_w, half_h) if step_x else (half_h, half_w)
    travel = TRAVEL_FRACTION * size
    # Continuous extent of the canvas minus the margin (pixel-index coordinates).
    low, high = -0.5 + MARGIN_PX, size - 0.5 - MARGIN_PX
    along_min, along_max = low + along_half, high - along_half - travel
    across_min, across_max = low + across_half, high - across_half
    assert along_min <= along_max and across_min <= across_max, "size checked by the caller"
    # Draw order is part of the determinism contract: along-axis, then across.
    path_start = rng.uniform(along_min, along_max)  # the smaller end of the path
    across = rng.uniform(across_min, across_max)
    sign = step_x + step_y
    start = path_start if sign > 0 else path_start + travel
    progress = np.linspace(0.0, 1.0, num_frames)  # ends exactly at 0 and 1
    along = start + sign * travel * progress
    if step_x:
        return np.stack([along, np.full(num_frames, across)], axis=1)
    return np.stack([np.full(num_frames, across), along], axis=1)


def render_clip(
    attributes: ShapeAttributes,
    *,
    size: int = DEFAULT_SIZE,
    num_frames: int = DEFAULT_NUM_FRAMES,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one clip following ``specs/shapes.md``.

    Args:
        attributes: what to draw.
        size: canvas side in pixels (>= 16).
        num_frames: frames (>= 2); the centre moves ``0.5 * size`` from first to last.
        rng: draws the start position (two ``uniform`` calls).

    Returns:
        ``frames``: ``uint8`` ``(T, size, size, 3)`` RGB, black background; fully
        covered pixels are exactly ``PALETTE[colour]``, edge pixels are the
        colour scaled by their coverage.
        ``centres``: ``float64`` ``(T, 2)``, the bounding-box centre as ``(x, y)``
        in pixel-index coordinates (pixel ``(r, c)`` has its centre at ``(c, r)``).
    """
    if not isinstance(attributes, ShapeAttributes):
        raise TypeError(f"attributes must be ShapeAttributes, got {type(attributes).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    if num_frames < MIN_NUM_FRAMES:
        raise ValueError(f"num_frames must be >= {MIN_NUM_FRAMES}, got {num_frames}")
    centres = _path(attributes, size, num_frames, rng)  # (T, 2)
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)  # (T, H, W, 3)
    for frame, centre in zip(frames, centres, strict=True):
        _draw(frame, attributes, centre, size)
    return frames, centres


# ----------------------------------------------------------------------------- the dataset


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def clip_attributes(index: int, *, seed: int) -> ShapeAttributes:
    """Attributes of dataset clip ``index``: entry ``index % 144`` of a seeded
    permutation drawn afresh for every block of 144 clips, so any 144
    consecutive clips starting at a multiple of 144 show every caption once."""
    _check_seed(seed)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    cycle, position = divmod(index, NUM_COMBINATIONS)
    order = np.random.default_rng([seed, _PERMUTATION_STREAM, cycle]).permutation(NUM_COMBINATIONS)
    return _ALL_ATTRIBUTES[int(order[position])]


def clip_rng(index: int, *, seed: int) -> np.random.Generator:
    """The generator that places dataset clip ``index`` (depends only on ``seed, index``)."""
    _check_seed(seed)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng([seed, _POSITION_STREAM, index])


def render_dataset_clip(
    index: int, *, seed: int, size: int = DEFAULT_SIZE, num_frames: int = DEFAULT_NUM_FRAMES
) -> tuple[ShapeAttributes, np.ndarray, np.ndarray]:
    """Regenerate clip ``index`` of a dataset alone: ``(attributes, frames, centres)``.

    Same arrays :func:`generate_shapes_dataset` encodes for that ``seed``,
    ``size`` and ``num_frames`` (shapes as in :func:`render_clip`).
    """
    attributes = clip_attributes(index, seed=seed)
    frames, centres = render_clip(
        attributes, size=size, num_frames=num_frames, rng=clip_rng(index, seed=seed)
    )
    return attributes, frames, centres


@dataclass(frozen=True)
class ShapesDatasetResult:
    """Where :func:`generate_shapes_dataset` wrote its manifests, and how many clips each holds."""

    train_manifest: Path
    val_manifest: Path
    num_train: int
    num_val: int


def _validation_indices(
    num_clips: int, *, seed: int, val_fraction: float, excluded: frozenset[str]
) -> set[int]:
    """Clips for validation: a seeded random ``val_fraction`` plus every excluded caption."""
    num_random = round(val_fraction * num_clips)
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(num_clips)
    chosen = {int(index) for index in order[:num_random]}
    chosen.update(
        index for index in range(num_clips) if clip_attributes(index, seed=seed).caption in excluded
    )
    return chosen


def generate_shapes_dataset(
    out_dir: str | os.PathLike,
    *,
    num_clips: int,
    size: int = DEFAULT_SIZE,
    num_frames: int = DEFAULT_NUM_FRAMES,
    fps: float = DEFAULT_FPS,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    exclude: Iterable[str] = (),
    paraphrase: bool = False,
    lossless: bool = False,
    crf: int = DEFAULT_SHAPES_CRF,
    progress: bool = True,
) -> ShapesDatasetResult:
    """Render and write a shapes dataset.

    Writes ``out_dir/clips/000000.mp4`` ... (H.264 yuv420p at ``crf``; ``.mkv``
    lossless FFV1 when ``lossless``) and then, once every clip is on disk,
    ``out_dir/train.jsonl`` and ``out_dir/val.jsonl`` (paths relative to
    ``out_dir``), one line per clip in index order.

    Args:
        out_dir: output folder (created; existing clips with the same names are
            overwritten, others are left alone and are not in the manifests).
        num_clips: clips to render (>= 1). Clip ``i`` shows
            :func:`clip_attributes` ``(i, seed=seed)``.
        size, num_frames: as in :func:`render_clip`.
        fps: frame rate stored in the files and the manifest.
        seed: non-negative; fixes captions, positions, the split and paraphrases.
        val_fraction: share of clips drawn at random for validation, in ``[0, 1)``.
        exclude: canonical captions left out of training; their clips always go
            to validation (compositional generalisation).
        paraphrase: caption each clip with :func:`paraphrase_caption` instead of
            its canonical caption. Pixels, attributes and the split are unchanged.
        lossless: write FFV1 ``.mkv`` instead of H.264 ``.mp4``.
        crf: H.264 constant rate factor (ignored when ``lossless``).
        progress: show a tqdm progress bar.

    Determinism: the same arguments give byte-identical manifests, and with
    ``lossless`` clips that decode to exactly the rendered frames, on any
    machine. H.264 clips are usually byte-identical too (containers are
    written bit-exactly, libx264 runs one thread), but libx264 was measured to
    encode a few clips differently from run to run on a busy machine (16 of
    1024 between two demo runs), so the demo writes lossless clips.

    Raises:
        ValueError: a bad count, fraction, size, seed or excluded caption.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    if num_frames < MIN_NUM_FRAMES:
        raise ValueError(f"num_frames must be >= {MIN_NUM_FRAMES}, got {num_frames}")
    if not lossless and size % 2:
        # Checked up front so that no clip is written before the failure.
        raise ValueError(f"H.264 yuv420p needs an even size, got {size}; use lossless=True")
    _check_seed(seed)
    if isinstance(exclude, str):
        raise TypeError("exclude must be a collection of captions, not a single string")
    known = set(canonical_captions())
    excluded = frozenset(exclude)
    for caption in sorted(excluded):
        if caption not in known:
            raise ValueError(
                f"cannot exclude {caption!r}: not a canonical shapes caption "
                f"({_CAPTION_GRAMMAR!r}, see canonical_captions())"
            )

    out_dir = Path(out_dir).absolute()
    clips_dir = out_dir / "clips"
    suffix = ".mkv" if lossless else ".mp4"
    validation = _validation_indices(
        num_clips, seed=seed, val_fraction=val_fraction, excluded=excluded
    )
    if len(validation) == num_clips:
        raise ValueError(
            f"no clips left for training: {len(validation)} of {num_clips} go to validation "
            "(lower val_fraction, exclude fewer captions or render more clips)"
        )

    train: list[ClipRecord] = []
    val: list[ClipRecord] = []
    for index in tqdm(range(num_clips), desc="shapes", unit="clip", disable=not progress):
        attributes, frames, _ = render_dataset_clip(
            index, seed=seed, size=size, num_frames=num_frames
        )
        path = clips_dir / f"{index:0{_CLIP_NAME_DIGITS}d}{suffix}"
        write_video(path, frames, fps, crf=crf)
        caption = attributes.caption
        if paraphrase:
            caption = paraphrase_caption(
                attributes, np.random.default_rng([seed, _PARAPHRASE_STREAM, index])
            )
        record = ClipRecord(
            path=path,
            caption=caption,
            fps=fps,
            num_frames=num_frames,
            width=size,
            height=size,
            duration=num_frames / fps,
            attributes=attributes.to_dict(),
        )
        (val if index in validation else train).append(record)

    train_manifest = write_manifest(out_dir / "train.jsonl", train)
    val_manifest = write_manifest(out_dir / "val.jsonl", val)
    return ShapesDatasetResult(
        train_manifest=train_manifest,
        val_manifest=val_manifest,
        num_train=len(train),
        num_val=len(val),
    )
