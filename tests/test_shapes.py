"""The shapes generator follows specs/shapes.md: every rule is measured on pixels.

Geometry is checked against values written out from the spec here (not read
back from the module), so a wrong constant in the module fails a test.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from moviegen.data import shapes
from moviegen.data.manifest import read_manifest
from moviegen.data.shapes import (
    PALETTE,
    ShapeAttributes,
    all_attributes,
    canonical_captions,
    clip_attributes,
    generate_shapes_dataset,
    paraphrase_caption,
    render_clip,
    render_dataset_clip,
)
from moviegen.data.video_io import read_video

# The contract, copied from specs/shapes.md.
SPEC_PALETTE = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (40, 60, 230),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 220),
}
SPEC_WIDTH_FRACTION = {"small": 0.20, "large": 0.35}
SPEC_TRAVEL_FRACTION = 0.5
SPEC_FILL_RATIO = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
SPEC_MOTION = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}  # (axis, sign)
CAPTION_RE = re.compile(
    r"^a (small|large) (red|green|blue|yellow|magenta|cyan) (circle|square|triangle) "
    r"moving (left|right|up|down)$"
)
TRIANGLE_RATIO = math.sqrt(3) / 2

# Tolerances, in pixels unless stated.
CENTROID_TOL = 0.1  # anti-aliased edges make the centroid exact to ~1/64 px
EXTENT_SLACK = 0.5  # sub-sample slivers at both ends of a span may stay black
MOMENT_SIZE_TOL = 0.1  # width from second moments of anti-aliased coverage
# Mean |difference| of decoded pixels between two clips of one seed (measured
# 0, or 0.03-0.37 when libx264 re-decides; two different clips: 16.3).
SAME_SEED_MEAN_PIXEL_DIFF = 1.0
SUPERSAMPLED_WIDTH_TOL = 0.25  # square width from coverage: 1/8 px quantisation per edge
FILL_TOL = 0.01  # fill ratio from exact coverage
THRESHOLD_FILL_TOL = 0.08  # fill ratio of a thresholded mask (how the evaluator sees it)
# Per channel, median of a flat interior after RGB -> yuv420p -> RGB (up to 3
# levels for yellow on its own) and crf 15 motion-compensated coding.
H264_MEDIAN_TOL = 6


def coverage(frame: np.ndarray, colour: str) -> np.ndarray:
    """Per-pixel coverage in [0, 1] recovered from a rendered ``(H, W, 3)`` frame."""
    rgb = SPEC_PALETTE[colour]
    channel = int(np.argmax(rgb))  # the brightest channel quantises coverage finest
    return frame[..., channel].astype(np.float64) / rgb[channel]


def inset_distance(attrs: ShapeAttributes, centre, size: int) -> np.ndarray:
    """Lower bound of the distance inside the shape for every pixel centre (< 0 outside).

    ``>= 1`` means the whole pixel lies inside; ``<= -1`` means it lies wholly outside.
    """
    width = SPEC_WIDTH_FRACTION[attrs.size] * size
    half_w = width / 2
    half_h = width * TRIANGLE_RATIO / 2 if attrs.shape == "triangle" else half_w
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = cols - centre[0], rows - centre[1]
    if attrs.shape == "circle":
        return half_w - np.hypot(dx, dy)
    if attrs.shape == "square":
        return np.minimum(half_w - np.abs(dx), half_h - np.abs(dy))
    depth = dy + half_h  # below the apex
    return np.minimum(half_h - dy, (depth - math.sqrt(3) * np.abs(dx)) / 2)


def centroid(frame: np.ndarray, colour: str) -> np.ndarray:
    """Coverage-weighted centroid ``(x, y)`` in pixel-index coordinates."""
    weight = coverage(frame, colour)
    rows, cols = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]]
    return np.array([(weight * cols).sum(), (weight * rows).sum()]) / weight.sum()


# Variance of x and y over a uniformly filled shape, as a multiple of width**2
# and height**2: square w^2/12; disc r^2/4 = w^2/16; triangle w^2/24 and h^2/18.
SHAPE_VARIANCE = {
    "square": (1 / 12, 1 / 12),
    "circle": (1 / 16, 1 / 16),
    "triangle": (1 / 24, 1 / 18),
}


def moment_size(frame: np.ndarray, colour: str, shape: str) -> tuple[float, float]:
    """Width and height of the shape recovered from the coverage's second moments."""
    weight = coverage(frame, colour)
    rows, cols = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]]
    mean_x, mean_y = centroid(frame, colour)
    var_x = (weight * (cols - mean_x) ** 2).sum() / weight.sum()
    var_y = (weight * (rows - mean_y) ** 2).sum() / weight.sum()
    # A pixel's own extent adds 1/12 px^2 (the box filter of area sampling).
    unit_x, unit_y = SHAPE_VARIANCE[shape]
    return math.sqrt((var_x - 1 / 12) / unit_x), math.sqrt((var_y - 1 / 12) / unit_y)


def extents(frame: np.ndarray) -> tuple[int, int]:
    """Width and height in pixels of the non-black region."""
    mask = frame.any(axis=-1)
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1


def render(attrs: ShapeAttributes, *, size: int = 64, seed: int = 0, num_frames: int = 16):
    return render_clip(attrs, size=size, num_frames=num_frames, rng=np.random.default_rng(seed))


# ----------------------------------------------------------------------------- constants, captions


def test_constants_match_the_spec():
    assert dict(PALETTE) == SPEC_PALETTE
    assert dict(shapes.SIZE_FRACTIONS) == SPEC_WIDTH_FRACTION
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert shapes.DIRECTIONS == ("left", "right", "up", "down")
    assert shapes.TRAVEL_FRACTION == SPEC_TRAVEL_FRACTION
    assert shapes.MARGIN_PX == 1
    with pytest.raises(TypeError):
        PALETTE["red"] = (0, 0, 0)  # the contract is read-only


def test_144_distinct_canonical_captions_follow_the_grammar():
    captions = canonical_captions()
    assert len(captions) == 144
    assert len(set(captions)) == 144
    for caption in captions:
        assert CAPTION_RE.fullmatch(caption), caption
    assert captions == [attrs.caption for attrs in all_attributes()]
    assert ShapeAttributes("small", "red", "circle", "left").caption == (
        "a small red circle moving left"
    )


def test_from_caption_round_trips_every_caption():
    for attrs in all_attributes():
        parsed = ShapeAttributes.from_caption(attrs.caption)
        assert parsed == attrs
        assert parsed.to_dict() == {
            "size": attrs.size,
            "colour": attrs.colour,
            "shape": attrs.shape,
            "direction": attrs.direction,
        }


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a small red circle moving left.",
        "A small red circle moving left",
        "a small red circle moving left ",
        "a small red circle  moving left",
        "a big red circle moving left",
        "a small purple circle moving left",
        "a small red hexagon moving left",
        "a small red circle moving sideways",
        "a red small circle moving left",
    ],
)
def test_from_caption_rejects_non_canonical_captions(caption):
    with pytest.raises(ValueError, match="not a canonical shapes caption"):
        ShapeAttributes.from_caption(caption)


def test_attributes_reject_unknown_values():
    with pytest.raises(ValueError, match="colour"):
        ShapeAttributes("small", "purple", "circle", "left")
    with pytest.raises(ValueError, match="size"):
        ShapeAttributes("big", "red", "circle", "left")


def test_paraphrases_are_deterministic_keep_colour_and_vary_wording():
    attrs = ShapeAttributes("large", "blue", "circle", "left")
    seen = {paraphrase_caption(attrs, np.random.default_rng(seed)) for seed in range(200)}
    assert len(seen) > 10
    assert all(" blue " in caption for caption in seen)
    assert any(" big " in caption for caption in seen)
    assert any("to the left" in caption for caption in seen)
    small_up = ShapeAttributes("small", "red", "square", "up")
    seen_up = {paraphrase_caption(small_up, np.random.default_rng(seed)) for seed in range(200)}
    assert any(" tiny " in caption for caption in seen_up)
    assert any("heading up" in caption for caption in seen_up)
    first = paraphrase_caption(attrs, np.random.default_rng(7))
    assert first == paraphrase_caption(attrs, np.random.default_rng(7))


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("colour", list(SPEC_PALETTE))
@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_interior_is_the_exact_palette_colour_and_outside_is_black(colour, shape):
    rgb = np.array(SPEC_PALETTE[colour])
    for size_name in SPEC_WIDTH_FRACTION:
        attrs = ShapeAttributes(size_name, colour, shape, "right")
        frames, centres = render(attrs, seed=3)
        assert frames.dtype == np.uint8 and frames.shape == (16, 64, 64, 3)
        for frame, centre in zip(frames, centres, strict=True):
            inset = inset_distance(attrs, centre, 64)
            interior, exterior = inset >= 1, inset <= -1
            assert interior.sum() > 0
            assert (frame[interior] == rgb).all()
            assert (frame[exterior] == 0).all()
            # Edge pixels are the colour scaled by coverage, never another hue.
            assert (frame <= rgb).all()
            scale = coverage(frame, colour)[..., None]
            assert np.abs(frame - scale * rgb).max() <= 1


@pytest.mark.parametrize("size_name", ["small", "large"])
@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_bounding_box_width_and_triangle_height(size_name, shape, size):
    attrs = ShapeAttributes(size_name, "green", shape, "down")
    frames, _ = render(attrs, size=size, seed=1, num_frames=2)
    width = SPEC_WIDTH_FRACTION[size_name] * size
    height = width * TRIANGLE_RATIO if shape == "triangle" else width
    for frame in frames:
        # Whole pixels touched: a span of length w touches between ceil(w) and
        # floor(w) + 2 pixels (slivers thinner than a sub-sample may not show).
        touched_w, touched_h = extents(frame)
        assert width - EXTENT_SLACK <= touched_w < width + 2
        assert height - EXTENT_SLACK <= touched_h < height + 2
        # Sub-pixel: the coverage's second moments give the exact width and height.
        measured_w, measured_h = moment_size(frame, "green", shape)
        assert measured_w == pytest.approx(width, abs=MOMENT_SIZE_TOL)
        assert measured_h == pytest.approx(height, abs=MOMENT_SIZE_TOL)
        if shape == "triangle":
            ratio_tol = 2 * MOMENT_SIZE_TOL / width  # both sizes may err by the tolerance
            assert measured_h / measured_w == pytest.approx(TRIANGLE_RATIO, abs=ratio_tol)
        if shape == "square":
            # Anti-aliased columns add up to the true width.
            column_cover = coverage(frame, "green").max(axis=0).sum()
            assert abs(column_cover - width) <= SUPERSAMPLED_WIDTH_TOL


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_fill_ratio_of_each_shape(shape):
    attrs = ShapeAttributes("large", "yellow", shape, "left")
    frames, _ = render(attrs, size=128, seed=2, num_frames=2)
    width = SPEC_WIDTH_FRACTION["large"] * 128
    height = width * TRIANGLE_RATIO if shape == "triangle" else width
    area = coverage(frames[0], "yellow").sum()
    assert area / (width * height) == pytest.approx(SPEC_FILL_RATIO[shape], abs=FILL_TOL)
    # As an evaluator sees it: a thresholded mask inside its own bounding box.
    for size_name in SPEC_WIDTH_FRACTION:
        frames, _ = render(ShapeAttributes(size_name, "yellow", shape, "up"), seed=5)
        for frame in frames[[0, -1]]:
            mask = coverage(frame, "yellow") >= 0.5
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
            assert mask.sum() / box == pytest.approx(SPEC_FILL_RATIO[shape], abs=THRESHOLD_FILL_TOL)


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_centre_travels_half_the_canvas_along_the_named_axis(direction, shape):
    size, num_frames = 64, 16
    attrs = ShapeAttributes("small", "magenta", shape, direction)
    frames, centres = render(attrs, size=size, seed=11, num_frames=num_frames)
    measured = np.stack([centroid(frame, "magenta") for frame in frames])  # (T, 2)
    axis, sign = SPEC_MOTION[direction]
    travel = measured[-1] - measured[0]
    assert travel[axis] == pytest.approx(sign * SPEC_TRAVEL_FRACTION * size, abs=CENTROID_TOL)
    assert np.ptp(measured[:, 1 - axis]) <= CENTROID_TOL  # other axis constant
    # Constant velocity: centroids lie on a straight, evenly spaced line.
    expected = measured[0] + np.linspace(0, 1, num_frames)[:, None] * travel
    assert np.abs(measured - expected).max() <= CENTROID_TOL
    # The returned centres are the bounding-box centres; a triangle's centroid is a
    # third of its half-height below the bounding-box centre.
    offset = np.zeros(2)
    if shape == "triangle":
        offset[1] = SPEC_WIDTH_FRACTION["small"] * size * TRIANGLE_RATIO / 2 / 3
    assert np.abs(measured - centres - offset).max() <= CENTROID_TOL
    assert centres.shape == (num_frames, 2) and centres.dtype == np.float64


@pytest.mark.parametrize("size", [32, 64, 128])
def test_object_stays_inside_the_canvas_with_a_margin(size):
    for seed in range(4):
        for attrs in all_attributes()[seed::4]:
            frames, _ = render(attrs, size=size, seed=seed, num_frames=4)
            border = np.concatenate(
                [frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1
            )
            assert not border.any(), (attrs, seed)
            # Nothing clipped: every frame shows the whole object's area.
            areas = [coverage(frame, attrs.colour).sum() for frame in frames]
            assert np.ptp(areas) <= 0.05 * max(areas)


def test_start_positions_are_random_and_span_the_allowed_range():
    size = 64
    attrs = ShapeAttributes("large", "cyan", "square", "right")
    starts = np.stack([render(attrs, seed=seed, num_frames=2)[1][0] for seed in range(300)])
    half_w = SPEC_WIDTH_FRACTION["large"] * size / 2
    low, high = -0.5 + 1 + half_w, size - 0.5 - 1 - half_w
    travel = SPEC_TRAVEL_FRACTION * size
    # x starts anywhere that keeps the whole path in, y anywhere inside the margin.
    assert starts[:, 0].min() == pytest.approx(low, abs=1.0)
    assert starts[:, 0].max() == pytest.approx(high - travel, abs=1.0)
    assert starts[:, 1].min() == pytest.approx(low, abs=1.0)
    assert starts[:, 1].max() == pytest.approx(high, abs=1.0)


def test_render_rejects_bad_arguments():
    attrs = ShapeAttributes("small", "red", "circle", "left")
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="size"):
        render_clip(attrs, size=15, rng=rng)
    with pytest.raises(ValueError, match="num_frames"):
        render_clip(attrs, num_frames=1, rng=rng)
    with pytest.raises(TypeError, match="Generator"):
        render_clip(attrs, rng=0)
    # The smallest legal canvas still fits the largest object and its path.
    frames, _ = render_clip(ShapeAttributes("large", "red", "square", "up"), size=16, rng=rng)
    assert not frames[:, 0].any() and not frames[:, -1].any()


def test_clip_attributes_cover_all_captions_evenly():
    captions = [clip_attributes(index, seed=4).caption for index in range(2 * 144)]
    assert sorted(captions[:144]) == sorted(canonical_captions())
    assert sorted(captions[144:]) == sorted(canonical_captions())
    assert captions[:144] != captions[144:]  # a fresh permutation per cycle
    assert captions[:144] != [clip_attributes(i, seed=5).caption for i in range(144)]


# ----------------------------------------------------------------------------- files


def test_dataset_files_manifest_and_decoded_colours(tmp_path):
    result = generate_shapes_dataset(tmp_path, num_clips=10, seed=0, progress=False)
    assert (result.num_train, result.num_val) == (9, 1)
    records = read_manifest(result.train_manifest) + read_manifest(result.val_manifest)
    assert len(records) == 10
    first_line = json.loads(result.train_manifest.read_text().splitlines()[0])
    assert first_line["path"].startswith("clips/") and first_line["path"].endswith(".mp4")
    for record in records:
        attrs = ShapeAttributes.from_caption(record.caption)
        assert record.attributes == attrs.to_dict()
        assert (record.fps, record.num_frames, record.width, record.height) == (8, 16, 64, 64)
        assert record.duration == 2.0
        assert record.path.is_file()
    record = records[0]
    attrs = ShapeAttributes.from_caption(record.caption)
    index = int(record.path.stem)
    _, _, centres = render_dataset_clip(index, seed=0)
    decoded = read_video(record.path)
    assert decoded.shape == (16, 64, 64, 3)
    rgb = np.array(SPEC_PALETTE[attrs.colour])
    for frame, centre in zip(decoded, centres, strict=True):
        deep_inside = inset_distance(attrs, centre, 64) >= 2
        median = np.median(frame[deep_inside], axis=0)
        assert np.abs(median - rgb).max() <= H264_MEDIAN_TOL
        nearest = min(SPEC_PALETTE, key=lambda name: np.abs(median - SPEC_PALETTE[name]).sum())
        assert nearest == attrs.colour


def test_lossless_clips_decode_to_the_exact_rendered_frames(tmp_path):
    result = generate_shapes_dataset(
        tmp_path, num_clips=3, size=32, seed=9, lossless=True, val_fraction=0.0, progress=False
    )
    records = read_manifest(result.train_manifest)
    assert [record.path.name for record in records] == ["000000.mkv", "000001.mkv", "000002.mkv"]
    for index, record in enumerate(records):
        attrs, frames, _ = render_dataset_clip(index, seed=9, size=32)
        assert record.caption == attrs.caption
        assert np.array_equal(read_video(record.path), frames)
    again = generate_shapes_dataset(
        tmp_path / "again",
        num_clips=3,
        size=32,
        seed=9,
        lossless=True,
        val_fraction=0.0,
        progress=False,
    )
    for record, repeat in zip(records, read_manifest(again.train_manifest), strict=True):
        assert record.path.read_bytes() == repeat.path.read_bytes(), "mkv bytes are bit-exact"


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    options = dict(num_clips=8, size=32, num_frames=8, val_fraction=0.25, progress=False)
    runs = [
        generate_shapes_dataset(tmp_path / name, seed=seed, **options)
        for name, seed in (("a", 3), ("b", 3), ("c", 4))
    ]
    a, b, c = (tmp_path / name for name in "abc")
    for manifest in ("train.jsonl", "val.jsonl"):
        assert (a / manifest).read_bytes() == (b / manifest).read_bytes()
    clips = sorted(path.name for path in (a / "clips").iterdir())
    assert len(clips) == 8
    for name in clips:
        # Equal frames go into the encoder (md5-checked), but libx264 on one
        # thread still gives other bytes for a small clip now and then (2 of
        # 150-200 encodes of one 32x32 clip under load, decoded pixels up to 24
        # apart, docs/BENCHMARKS.md): compare what a reader sees, closely.
        first, second = (read_video(root / "clips" / name).astype(np.float64) for root in (a, b))
        assert first.shape == second.shape
        assert np.abs(first - second).mean() < SAME_SEED_MEAN_PIXEL_DIFF
    assert runs[0].train_manifest == a / "train.jsonl"
    assert (runs[0].num_train, runs[0].num_val) == (runs[1].num_train, runs[1].num_val) == (6, 2)
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    assert any(
        (a / "clips" / name).read_bytes() != (c / "clips" / name).read_bytes() for name in clips
    )


def test_paraphrase_changes_captions_only(tmp_path):
    options = dict(num_clips=6, size=16, num_frames=2, seed=2, val_fraction=0.0, progress=False)
    plain = generate_shapes_dataset(tmp_path / "plain", **options)
    varied = generate_shapes_dataset(tmp_path / "varied", paraphrase=True, **options)
    plain_records, varied_records = (
        read_manifest(result.train_manifest) for result in (plain, varied)
    )
    assert all(CAPTION_RE.fullmatch(record.caption) for record in plain_records)
    assert any(not CAPTION_RE.fullmatch(record.caption) for record in varied_records)
    for before, after in zip(plain_records, varied_records, strict=True):
        assert before.attributes == after.attributes
        assert before.path.read_bytes() == after.path.read_bytes()


def test_excluded_captions_never_reach_training(tmp_path):
    excluded = {clip_attributes(index, seed=1).caption for index in (0, 1)}
    result = generate_shapes_dataset(
        tmp_path, num_clips=20, size=16, num_frames=2, seed=1, exclude=excluded, progress=False
    )
    train = [record.caption for record in read_manifest(result.train_manifest)]
    val = [record.caption for record in read_manifest(result.val_manifest)]
    assert not excluded & set(train)
    assert excluded <= set(val)
    assert (result.num_train, result.num_val) == (len(train), len(val))
    assert len(train) + len(val) == 20
    with pytest.raises(ValueError, match="a small red circle moving sideways"):
        generate_shapes_dataset(
            tmp_path / "bad", num_clips=2, exclude=["a small red circle moving sideways"]
        )


@pytest.mark.parametrize(("val_fraction", "num_val"), [(0.0, 0), (0.25, 5), (0.5, 10)])
def test_validation_fraction_is_honoured_and_seeded(tmp_path, val_fraction, num_val):
    options = dict(num_clips=20, size=16, num_frames=2, val_fraction=val_fraction, progress=False)
    result = generate_shapes_dataset(tmp_path / "a", seed=0, **options)
    assert (result.num_train, result.num_val) == (20 - num_val, num_val)
    if num_val:
        other = generate_shapes_dataset(tmp_path / "b", seed=1, **options)
        val_a = {r.path.name for r in read_manifest(result.val_manifest)}
        val_b = {r.path.name for r in read_manifest(other.val_manifest)}
        assert val_a != val_b


def test_manifests_are_written_only_after_every_clip(tmp_path, monkeypatch):
    written = []

    def failing_write(path, frames, fps, *, crf):
        if len(written) == 2:
            raise RuntimeError("disk full")
        written.append(path)

    monkeypatch.setattr(shapes, "write_video", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_shapes_dataset(tmp_path, num_clips=5, size=16, num_frames=2, progress=False)
    assert not (tmp_path / "train.jsonl").exists()
    assert not (tmp_path / "val.jsonl").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clips": 0}, "num_clips"),
        ({"num_clips": 2, "val_fraction": 1.0}, "val_fraction"),
        ({"num_clips": 2, "val_fraction": -0.1}, "val_fraction"),
        ({"num_clips": 2, "size": 15}, "size"),
        ({"num_clips": 2, "size": 17}, "even"),
        ({"num_clips": 2, "num_frames": 1}, "num_frames"),
        ({"num_clips": 2, "seed": -1}, "seed"),
        ({"num_clips": 1, "val_fraction": 0.9}, "no clips left for training"),
    ],
)
def test_generate_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_shapes_dataset(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())
