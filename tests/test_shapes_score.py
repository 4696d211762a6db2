"""The shapes scorer reads the generator's clips back correctly and flags mismatches.

Clips come from the project's own generator (in memory); the expected geometry
(fill ratios, areas, travel) is written out here from specs/shapes.md rather
than read from the module under test.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from moviegen.data.shapes import PALETTE, ShapeAttributes, all_attributes, render_clip
from moviegen.data.video_io import write_video
from moviegen.eval.shapes_score import (
    PROMPTS_FILE,
    ShapeReading,
    analyse_video,
    score_samples,
    score_video,
)

ATTRIBUTES = all_attributes()  # the 144 canonical combinations
NUM_FRAMES = 16
FPS = 8
# specs/shapes.md: box width per size, triangle height over width, travel.
SPEC_WIDTH_FRACTION = {"small": 0.20, "large": 0.35}
SPEC_FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
SPEC_TRAVEL_FRACTION = 0.5
# Std of the "moderate" Gaussian noise the reading must survive, in 0-255 units.
NOISE_STD = 10.0


def _render(attributes: ShapeAttributes, *, size: int = 64, seed: int = 0) -> np.ndarray:
    frames, _ = render_clip(
        attributes, size=size, num_frames=NUM_FRAMES, rng=np.random.default_rng(seed)
    )
    return frames  # (T, size, size, 3)


def _misreadings(size: int, attributes: list[ShapeAttributes]) -> list[str]:
    """Captions the scorer does not read back exactly, with what it read."""
    wrong = []
    for index, attrs in enumerate(attributes):
        reading = analyse_video(_render(attrs, size=size, seed=index))
        if reading.attributes() != attrs.to_dict():
            wrong.append(f"{attrs.caption!r} read as {reading.attributes()}")
    return wrong


def _add_noise(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = frames.astype(np.float64) + rng.normal(0.0, NOISE_STD, frames.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _coverage(frames: np.ndarray, colour: str) -> np.ndarray:
    """The generator's per-pixel coverage ``(T, H, W, 1)``: pixels are colour * coverage."""
    brightest = int(np.argmax(PALETTE[colour]))
    return frames[..., brightest : brightest + 1] / PALETTE[colour][brightest]


# ----------------------------------------------------------------------------- clean clips


def test_reads_all_144_canonical_captions_at_64_px():
    assert len(ATTRIBUTES) == 144
    assert _misreadings(64, ATTRIBUTES) == []


@pytest.mark.parametrize("size", [32, 128])
def test_reads_a_sample_of_captions_at_other_sizes(size):
    # Every 5th combination still covers every colour, shape, size and direction.
    sample = ATTRIBUTES[::5]
    for name in ("size", "colour", "shape", "direction"):
        assert len({getattr(attrs, name) for attrs in sample}) == len(
            {getattr(attrs, name) for attrs in ATTRIBUTES}
        )
    assert _misreadings(size, sample) == []


@pytest.mark.parametrize("shape", ["square", "circle", "triangle"])
@pytest.mark.parametrize("size_name", ["small", "large"])
def test_measurements_match_the_spec_geometry(shape, size_name):
    size = 128
    attrs = ShapeAttributes(size=size_name, colour="cyan", shape=shape, direction="down")
    reading = analyse_video(_render(attrs, size=size, seed=3))
    width = SPEC_WIDTH_FRACTION[size_name]
    height = width * math.sqrt(3) / 2 if shape == "triangle" else width
    assert reading.area_fraction == pytest.approx(SPEC_FILL[shape] * width * height, rel=0.02)
    # Pixels only shorten a triangle's box (its corners), so its tolerance is wider.
    assert reading.fill_ratio == pytest.approx(SPEC_FILL[shape], abs=0.05)
    assert reading.foreground_rgb == pytest.approx(PALETTE["cyan"], abs=1)
    assert reading.colour_distance == pytest.approx(0.0, abs=1)
    assert reading.background_rgb == (0.0, 0.0, 0.0)
    assert reading.num_foreground_frames == NUM_FRAMES
    # Centroids are compared between the medians of the first and the last 3
    # frames, i.e. frames 1 and 14 of 0..15: 13/15 of the full travel.
    dx, dy = reading.displacement
    assert dx == pytest.approx(0.0, abs=0.5)
    assert dy == pytest.approx(SPEC_TRAVEL_FRACTION * size * 13 / 15, abs=0.5)


def test_score_video_on_a_correct_clip_is_all_true():
    attrs = ShapeAttributes(size="large", colour="magenta", shape="triangle", direction="up")
    assert score_video(_render(attrs), attrs) == {
        "colour": True,
        "shape": True,
        "size": True,
        "direction": True,
        "all_correct": True,
    }


# ----------------------------------------------------------------------------- one attribute changed


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("colour", "yellow"),
        ("colour", "cyan"),
        ("shape", "square"),
        ("shape", "triangle"),
        ("size", "large"),
    ],
)
def test_a_changed_attribute_is_read_and_flagged(name, value):
    expected = ShapeAttributes(size="small", colour="green", shape="circle", direction="right")
    changed = dataclasses.replace(expected, **{name: value})
    # The same seed places the object identically; only `name` differs.
    frames = _render(changed, seed=7)
    assert analyse_video(frames).attributes() == changed.to_dict()
    scores = score_video(frames, expected)
    assert scores[name] is False
    assert scores["all_correct"] is False
    assert all(scores[other] for other in ("colour", "shape", "size", "direction") if other != name)


@pytest.mark.parametrize(
    ("direction", "reversed_direction"),
    [("left", "right"), ("right", "left"), ("up", "down"), ("down", "up")],
)
def test_reversed_frames_read_the_opposite_direction(direction, reversed_direction):
    attrs = ShapeAttributes(size="large", colour="blue", shape="square", direction=direction)
    frames = _render(attrs, seed=11)[::-1]
    assert analyse_video(frames).direction == reversed_direction
    scores = score_video(frames, attrs)
    assert scores["direction"] is False
    assert scores["all_correct"] is False
    assert scores["colour"] and scores["shape"] and scores["size"]


def test_a_repainted_foreground_reads_the_new_colour():
    attrs = ShapeAttributes(size="small", colour="red", shape="triangle", direction="left")
    frames = _render(attrs, seed=5)
    repainted = np.rint(_coverage(frames, "red") * np.array(PALETTE["magenta"])).astype(np.uint8)
    reading = analyse_video(repainted)
    assert reading.colour == "magenta"
    assert reading.attributes() == {**attrs.to_dict(), "colour": "magenta"}
    assert score_video(repainted, attrs)["colour"] is False


# ----------------------------------------------------------------------------- undecidable readings


def test_an_all_black_video_reads_nothing():
    frames = np.zeros((NUM_FRAMES, 64, 64, 3), dtype=np.uint8)
    reading = analyse_video(frames)
    assert reading.attributes() == {"colour": None, "shape": None, "size": None, "direction": None}
    assert reading.num_foreground_frames == 0
    assert reading.fill_ratio is None and reading.area_fraction is None
    expected = ShapeAttributes(size="small", colour="red", shape="circle", direction="left")
    assert score_video(frames, expected) == {
        "colour": False,
        "shape": False,
        "size": False,
        "direction": False,
        "all_correct": False,
    }


def test_a_still_video_has_no_direction():
    attrs = ShapeAttributes(size="large", colour="yellow", shape="circle", direction="down")
    still = np.repeat(_render(attrs, seed=2)[:1], NUM_FRAMES, axis=0)
    reading = analyse_video(still)
    assert reading.direction is None
    assert reading.displacement == pytest.approx((0.0, 0.0), abs=1e-9)
    assert (reading.colour, reading.shape, reading.size) == ("yellow", "circle", "large")
    scores = score_video(still, attrs)
    assert scores["direction"] is False and scores["all_correct"] is False


def test_motion_below_the_minimum_has_no_direction():
    attrs = ShapeAttributes(size="small", colour="cyan", shape="square", direction="right")
    frames = _render(attrs, seed=4)
    # 4 of 16 frames: the two end frames are 1/15 of the travel apart, 1/30 of
    # the side, far under the spec's 0.15; the whole clip moves 13/30 > 0.15.
    short = analyse_video(frames[:4])
    assert short.direction is None
    assert short.travel_fraction < 0.15
    assert analyse_video(frames).direction == "right"


def test_a_one_frame_video_has_no_direction_but_the_rest():
    attrs = ShapeAttributes(size="large", colour="green", shape="triangle", direction="up")
    reading = analyse_video(_render(attrs)[:1])
    assert reading.direction is None and reading.displacement is None
    assert (reading.colour, reading.shape, reading.size) == ("green", "triangle", "large")


# ----------------------------------------------------------------------------- robustness


def test_moderate_noise_does_not_change_the_reading():
    rng = np.random.default_rng(0)
    changed = []
    for index, attrs in enumerate(ATTRIBUTES[::3]):
        frames = _render(attrs, seed=index)
        reading = analyse_video(_add_noise(frames, rng))
        if reading.attributes() != attrs.to_dict():
            changed.append(f"{attrs.caption!r} read as {reading.attributes()}")
    assert changed == []


def test_specks_away_from_the_object_are_ignored():
    attrs = ShapeAttributes(size="small", colour="blue", shape="circle", direction="up")
    frames = _render(attrs, seed=9).copy()
    # White 2x2 specks in every frame, well clear of the object's columns: were
    # they kept, they would stretch its box (fill ratio) and drag its centroid.
    object_columns = np.flatnonzero(frames.max(axis=(0, 1, 3)))
    column = 2 if object_columns.min() > 10 else 60
    assert np.abs(object_columns[:, None] - np.array([column, column + 1])).min() >= 4
    frames[:, 3:5, column : column + 2] = 255
    frames[:, 50:52, column : column + 2] = 255
    assert analyse_video(frames).attributes() == attrs.to_dict()


def test_a_grey_background_is_subtracted():
    attrs = ShapeAttributes(size="large", colour="red", shape="square", direction="left")
    frames = _render(attrs, seed=1)
    coverage = _coverage(frames, "red")
    grey = np.full(3, 90.0)
    composed = coverage * np.array(PALETTE["red"]) + (1 - coverage) * grey
    reading = analyse_video(np.rint(composed).astype(np.uint8))
    assert reading.background_rgb == pytest.approx(tuple(grey))
    assert reading.attributes() == attrs.to_dict()


def test_bad_frames_are_rejected():
    with pytest.raises(TypeError, match="uint8"):
        analyse_video(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        analyse_video(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="ShapeAttributes"):
        score_video(np.zeros((2, 8, 8, 3), dtype=np.uint8), "a small red circle moving left")


# ----------------------------------------------------------------------------- a folder of samples


def _write_prompts(folder, entries) -> None:
    lines = [entry if isinstance(entry, str) else json.dumps(entry) for entry in entries]
    (folder / PROMPTS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_score_samples_counts_scores_skips_and_lists(tmp_path):
    good = ShapeAttributes(size="small", colour="red", shape="circle", direction="left")
    other = ShapeAttributes(size="large", colour="cyan", shape="triangle", direction="down")
    write_video(tmp_path / "videos" / "good.mp4", _render(good, seed=1), FPS)
    write_video(tmp_path / "other.gif", _render(other, seed=2), FPS)
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all")
    wrong_direction = dataclasses.replace(other, direction="up")
    _write_prompts(
        tmp_path,
        [
            {"path": "videos/good.mp4", "prompt": f"FPS-{FPS} {good.caption}", "seed": 1},
            # The gif moves down but its prompt says up.
            {"path": "other.gif", "prompt": wrong_direction.caption, "seed": 2},
            {"path": "missing.mp4", "prompt": good.caption, "seed": 3},
            {"path": "corrupt.mp4", "prompt": good.caption, "seed": 4},
            {"path": "other.gif", "prompt": "a dog surfing a wave at sunset", "seed": 5},
        ],
    )
    score = score_samples(tmp_path)

    assert score.num_videos == 2
    assert score.accuracy == {"colour": 1.0, "shape": 1.0, "size": 1.0, "direction": 0.5}
    assert score.all_correct_rate == 0.5
    rows = {row["path"]: row for row in score.rows}
    assert set(rows) == {"videos/good.mp4", "other.gif"}
    assert rows["videos/good.mp4"]["all_correct"] is True
    assert rows["videos/good.mp4"]["expected"] == good.to_dict()
    assert rows["videos/good.mp4"]["seed"] == 1
    assert rows["other.gif"]["predicted"]["direction"] == "down"
    assert rows["other.gif"]["correct"]["direction"] is False

    assert score.num_skipped == 2
    assert {item["path"]: item["reason"] for item in score.skipped} == {
        "missing.mp4": "missing",
        "corrupt.mp4": "corrupt",
    }
    assert score.num_non_canonical == 1
    assert score.non_canonical[0]["prompt"] == "a dog surfing a wave at sunset"

    data = json.loads(json.dumps(score.to_dict(), allow_nan=False))
    assert data["num_videos"] == 2 and data["num_skipped"] == 2
    assert data["num_non_canonical"] == 1 and data["all_correct_rate"] == 0.5
    table = score.format_table()
    for text in ("videos/good.mp4", "other.gif", "missing.mp4", "a dog surfing", "50.0%"):
        assert text in table


def test_score_samples_with_nothing_scorable_reports_no_rates(tmp_path):
    _write_prompts(tmp_path, [{"path": "a.mp4", "prompt": "two cats", "seed": 0}])
    score = score_samples(tmp_path)
    assert score.num_videos == 0 and score.num_non_canonical == 1
    assert math.isnan(score.all_correct_rate)
    data = json.loads(json.dumps(score.to_dict(), allow_nan=False))
    assert data["all_correct_rate"] is None
    assert all(value is None for value in data["accuracy"].values())
    assert "n/a" in score.format_table()


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a.mp4", "a small red circle moving left"]', "JSON object"),
        ('{"path": "a.mp4", "seed": 0}', "'prompt'"),
        ('{"path": 3, "prompt": "a small red circle moving left"}', "'path'"),
        ('{"path": "a.mp4", "prompt": "a small red circle moving left", "seed": "x"}', "'seed'"),
    ],
)
def test_a_malformed_prompts_line_names_its_number(tmp_path, bad_line, message):
    good = {"path": "a.mp4", "prompt": "a small red circle moving left", "seed": 0}
    # Line 2 is blank (ignored, but still counted), so the bad one is line 3.
    _write_prompts(tmp_path, [good, "", bad_line, good])
    with pytest.raises(ValueError, match=rf"line 3: .*{message}"):
        score_samples(tmp_path)


def test_a_folder_without_prompts_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=PROMPTS_FILE):
        score_samples(tmp_path)


def test_reading_serialises_to_json():
    attrs = ShapeAttributes(size="small", colour="yellow", shape="square", direction="down")
    reading = analyse_video(_render(attrs))
    assert isinstance(reading, ShapeReading)
    data = json.loads(json.dumps(reading.to_dict(), allow_nan=False))
    assert data["shape"] == "square" and data["num_frames"] == NUM_FRAMES
