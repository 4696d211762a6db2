"""Video IO: round trips, frame-exact windows and fps resampling, bad input."""

from __future__ import annotations

import shutil
from fractions import Fraction
from functools import partial

import av
import numpy as np
import pytest
from PIL import Image

from conftest import decode_indices
from moviegen.data.video_io import (
    VideoDecodeError,
    VideoTooShortError,
    probe_video,
    read_video,
    resample_indices,
    write_video,
)


def moving_pattern(num_frames: int = 24, height: int = 64, width: int = 96) -> np.ndarray:
    """Smooth colour gradients drifting right: natural enough for lossy codecs."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for t in range(num_frames):
        red = 128 + 100 * np.sin((cols + 2 * t) / 9)
        green = 128 + 100 * np.cos(rows / 7)
        blue = 128 + 60 * np.sin((rows + cols - 3 * t) / 13)
        frames.append(np.stack([red, green, blue], axis=-1))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- round trips


# yuv420p halves chroma resolution: on this colourful pattern that alone costs a
# mean absolute error of about 3 (measured at crf 0), H.264 at crf 18 adds ~0.5.
# A GIF has 256 colours per frame: quantising this pattern costs about 7.
@pytest.mark.parametrize(
    ("suffix", "max_mae"),
    [(".mp4", 4.5), (".mov", 4.5), (".gif", 8.0), (".mkv", 0.0)],
)
def test_round_trip(tmp_path, suffix, max_mae):
    frames = moving_pattern()
    path = write_video(tmp_path / f"clip{suffix}", frames, fps=12)
    decoded = read_video(path)
    assert decoded.shape == frames.shape
    assert decoded.dtype == np.uint8
    mae = np.abs(decoded.astype(np.float64) - frames).mean()
    assert mae <= max_mae, f"{suffix}: mean absolute error {mae:.2f} > {max_mae}"
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height) == (24, 96, 64)
    # GIF delays are whole hundredths of a second: 1/12 s is stored as 0.08 s.
    assert info.fps == pytest.approx(12, rel=0.05)


def test_mp4_quality_follows_crf(tmp_path):
    frames = moving_pattern()
    errors = {}
    for crf in (0, 35):
        decoded = read_video(write_video(tmp_path / f"crf{crf}.mp4", frames, fps=8, crf=crf))
        errors[crf] = np.abs(decoded.astype(np.float64) - frames).mean()
    assert errors[0] < errors[35]


def test_image_files_are_one_frame_videos(tmp_path):
    frame = moving_pattern(1)[0]
    png = tmp_path / "still.png"
    Image.fromarray(frame).save(png)
    jpg = tmp_path / "still.jpg"
    Image.fromarray(frame).save(jpg, quality=95)
    assert np.array_equal(read_video(png)[0], frame)
    assert read_video(jpg).shape == (1, 64, 96, 3)
    info = probe_video(png)
    assert info.is_image and info.num_frames == 1 and (info.width, info.height) == (96, 64)
    with pytest.raises(VideoTooShortError):
        read_video(png, num_frames=2)


# ----------------------------------------------------------------------------- windows and fps


def test_resample_indices_rules():
    assert resample_indices(5, src_fps=10, dst_fps=5) == [0, 2, 4, 6, 8]
    assert resample_indices(5, src_fps=10, dst_fps=4) == [0, 2, 5, 7, 10]
    assert resample_indices(4, src_fps=10, dst_fps=20, start=3) == [3, 3, 4, 4]
    assert resample_indices(3, src_fps=30000 / 1001, dst_fps=30000 / 1001) == [0, 1, 2]
    assert resample_indices(3, src_fps=24, dst_fps=None, start=7) == [7, 8, 9]
    with pytest.raises(ValueError):
        resample_indices(3, src_fps=24, dst_fps=0)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".gif"])
def test_fps_resampling_picks_the_right_frames(index_clip, suffix):
    path = index_clip(40, fps=10, suffix=suffix)
    assert decode_indices(read_video(path, fps=5, num_frames=8)) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert decode_indices(read_video(path, fps=4, num_frames=4)) == [0, 2, 5, 7]
    assert decode_indices(read_video(path, fps=20, num_frames=6)) == [0, 0, 1, 1, 2, 2]
    # Reading to the end at half rate: frames 0, 2, ..., 38.
    assert decode_indices(read_video(path, fps=5)) == list(range(0, 40, 2))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_windowed_reads_return_the_right_frames(index_clip, suffix):
    path = index_clip(40, fps=10, suffix=suffix)
    assert decode_indices(read_video(path, start_frame=17, num_frames=5)) == [17, 18, 19, 20, 21]
    assert decode_indices(read_video(path, start_time=1.5, num_frames=3)) == [15, 16, 17]
    window = read_video(path, start_frame=11, num_frames=4, fps=5)
    assert decode_indices(window) == [11, 13, 15, 17]
    assert decode_indices(read_video(path, start_frame=36)) == [36, 37, 38, 39]


def test_window_parity_with_full_decode_across_key_frames(tmp_path):
    """Seeking must land on the same frames as decoding everything and slicing."""
    frames = moving_pattern(90, 48, 64)
    path = tmp_path / "gop.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25), options={"g": "8", "bf": "2"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    full = read_video(path)
    assert len(full) == 90
    for start in (0, 7, 8, 9, 33, 70):
        window = read_video(path, start_frame=start, num_frames=12)
        assert np.array_equal(window, full[start : start + 12]), f"start {start}"
    sparse = read_video(path, start_frame=5, num_frames=10, fps=12.5)
    assert np.array_equal(sparse, full[5:25:2])


def test_resize_rules(index_clip):
    path = index_clip(4, fps=10, height=48, width=64)
    assert read_video(path, size=24).shape == (4, 24, 32, 3)  # shorter side
    assert read_video(path, size=(32, 32)).shape == (4, 32, 32, 3)  # cover + centre crop
    assert read_video(path, size=(20, 60), crop=False).shape == (4, 20, 60, 3)  # stretch
    # Flat frames stay flat through the scaler, so indices survive resizing.
    assert decode_indices(read_video(path, size=(16, 16))) == [0, 1, 2, 3]


def test_crop_is_centred(tmp_path):
    frames = np.zeros((1, 40, 80, 3), dtype=np.uint8)
    frames[:, :, 20:60] = 255  # a white band in the middle half of the width
    path = write_video(tmp_path / "band.mkv", frames, fps=1)
    cropped = read_video(path, size=(40, 40))
    assert cropped.min() >= 250, "centre crop must keep exactly the middle band"


def test_too_short_is_a_typed_error(index_clip):
    path = index_clip(10, fps=10)
    with pytest.raises(VideoTooShortError) as caught:
        read_video(path, start_frame=5, num_frames=8)
    assert caught.value.num_available == 5
    assert caught.value.reason == "too_short"
    assert str(path) in str(caught.value)


# ----------------------------------------------------------------------------- writing errors


def test_write_rejects_bad_frames(tmp_path):
    frames = moving_pattern(2)
    with pytest.raises(TypeError, match="uint8"):
        write_video(tmp_path / "a.mp4", frames.astype(np.float32), fps=8)
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "a.mp4", frames[:, :63], fps=8)
    with pytest.raises(ValueError, match="T, H, W, 3"):
        write_video(tmp_path / "a.mp4", frames[..., :2], fps=8)
    with pytest.raises(ValueError, match=r"use \.mp4"):
        write_video(tmp_path / "a.xyz", frames, fps=8)
    # Odd sizes are fine for lossless mkv and GIF.
    assert read_video(write_video(tmp_path / "odd.mkv", frames[:, :63, :95], fps=8)).shape == (
        2,
        63,
        95,
        3,
    )


def test_torch_uint8_frames_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    frames = torch.from_numpy(moving_pattern(3))
    assert read_video(write_video(tmp_path / "t.mkv", frames, fps=8)).shape == (3, 64, 96, 3)


# ----------------------------------------------------------------------------- bad input


def _assert_decode_error(path, reason=None):
    for read in (read_video, partial(probe_video, verify=True)):
        with pytest.raises(VideoDecodeError) as caught:
            read(path)
        assert str(path) in str(caught.value), "the error must name the file"
        if reason is not None:
            assert caught.value.reason == reason


def test_random_bytes_named_mp4(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(50_000))
    _assert_decode_error(path, "corrupt")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    _assert_decode_error(path, "empty")


def test_directory_named_like_a_video(tmp_path):
    path = tmp_path / "folder.mp4"
    path.mkdir()
    _assert_decode_error(path, "not_a_file")


def test_missing_path(tmp_path):
    _assert_decode_error(tmp_path / "nowhere.mp4", "missing")


def test_corrupt_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    _assert_decode_error(path, "corrupt")


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.95])
def test_truncated_mp4_of_our_own(tmp_path, fraction):
    data = write_video(tmp_path / "whole.mp4", moving_pattern(24), fps=8).read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * fraction)])
    _assert_decode_error(path)


def test_truncated_faststart_mp4_is_caught_when_reading(tmp_path):
    """With the index at the front, a cut file opens but runs out of frames."""
    whole = tmp_path / "fast.mp4"
    with av.open(str(whole), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for array in moving_pattern(24):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = whole.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat"), "expected the index before the data"
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError) as caught:
        read_video(path)
    assert str(path) in str(caught.value)
    # Header-only probing believes the header; verify decodes and sees the truth.
    assert probe_video(path).num_frames == 24
    with pytest.raises(VideoDecodeError):
        probe_video(path, verify=True)


@pytest.mark.real_data
def test_truncated_real_mp4(real_data_dir, tmp_path):
    source = sorted(real_data_dir.glob("*.mp4"))[0]
    data = source.read_bytes()
    path = tmp_path / f"truncated_{source.name}"
    path.write_bytes(data[: len(data) // 2])
    _assert_decode_error(path)


@pytest.mark.real_data
def test_real_clips_decode_and_window_parity(real_data_dir, tmp_path):
    bikes = real_data_dir / "bikes.mp4"
    if not bikes.is_file():
        pytest.skip("bikes.mp4 not in the real data folder")
    info = probe_video(bikes)
    assert (info.num_frames, info.width, info.height) == (250, 640, 272)
    full = read_video(bikes, num_frames=200)
    for start in (0, 37, 120, 180):
        window = read_video(bikes, start_frame=start, num_frames=16)
        assert np.array_equal(window, full[start : start + 16]), f"start {start}"
    copy = tmp_path / "copy.mp4"
    shutil.copy(bikes, copy)
    assert read_video(copy, start_frame=240, size=(128, 128)).shape == (10, 128, 128, 3)
