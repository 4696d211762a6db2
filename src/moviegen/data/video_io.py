"""Video and image reading and writing on PyAV (FFmpeg) and Pillow.

Frames cross this module's boundary as ``uint8`` numpy arrays shaped
``(T, H, W, 3)`` in RGB order. Conversion to model tensors lives in
:mod:`moviegen.data.transforms`.

Reading never decodes more than it must: a window is found by seeking to the
key frame before its start and decoding forward until its last frame, and
resizing happens inside FFmpeg's scaler while each frame is converted to RGB.
Every failure (missing, empty, truncated or corrupt file, a directory, a format
FFmpeg does not know) surfaces as :class:`VideoDecodeError` naming the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "VideoDecodeError",
    "VideoInfo",
    "VideoTooShortError",
    "is_image_path",
    "is_media_path",
    "probe_video",
    "read_video",
    "resample_indices",
    "write_video",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mkv", ".webm", ".avi", ".mov", ".gif", ".m4v", ".mpg", ".mpeg", ".ts"}
)
# Still images are one-frame videos; this rate is reported for them so that
# duration arithmetic never divides by zero.
IMAGE_FPS = 1.0
# Default H.264 constant rate factor: visually lossless for our content sizes.
DEFAULT_CRF = 18
# libx264's output depends on its thread count, which by default follows the
# machine's CPU count, and with several threads it also depended on timing: with
# 4 threads, 1 of 120 shapes clips encoded twice came out different while the
# other core was busy. One thread makes it repeatable in most runs, not all:
# two fresh demo runs still wrote 16 of 1024 shapes clips differently, and
# encodes of the same frames in fresh processes with both cores busy gave two
# bitstreams in one of two sets of 16 (PyAV 18.1). Write lossless .mkv where
# every run must see the same pixels.
X264_THREADS = 1
# FFV1 is lossless whatever its threads; one thread writes the small frames
# this project makes 6x faster than the default slice threads (3.3 vs 19 ms per
# 16-frame 64x64 clip).
FFV1_THREADS = 1
# Guard against floating point error when mapping output frames to source frames
# (k * src_fps / dst_fps is often an integer that floats land just below).
_INDEX_EPS = 1e-6

# Errors raised by FFmpeg, Pillow and the OS for unreadable input. Anything else
# is a bug in our code and is allowed to propagate.
_READ_ERRORS = (
    av.FFmpegError,
    OSError,
    EOFError,
    ValueError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
    UnicodeDecodeError,
)


class VideoDecodeError(RuntimeError):
    """A file could not be read as a video or image.

    Attributes:
        path: the file that failed.
        reason: a short machine-readable reason (``missing``, ``empty``,
            ``not_a_file``, ``corrupt``, ``no_video_stream``, ``too_short``).
    """

    def __init__(self, path: str | os.PathLike, message: str, *, reason: str = "corrupt"):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {message}")


class VideoTooShortError(VideoDecodeError):
    """The file decodes but holds fewer frames than were asked for."""

    def __init__(self, path: str | os.PathLike, message: str, *, num_available: int):
        self.num_available = num_available
        super().__init__(path, message, reason="too_short")


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns about a file without decoding it all."""

    path: str
    num_frames: int
    fps: float
    width: int
    height: int
    duration: float
    codec: str
    is_image: bool

    def to_dict(self) -> dict:
        return asdict(self)


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_media_path(path: str | os.PathLike) -> bool:
    suffix = Path(path).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in VIDEO_EXTENSIONS


def _check_path(path: Path) -> None:
    """Raise a typed error for paths that are not readable regular files."""
    if not path.exists():
        raise VideoDecodeError(path, "no such file", reason="missing")
    if not path.is_file():
        raise VideoDecodeError(path, "not a regular file (a directory?)", reason="not_a_file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes)", reason="empty")


# ----------------------------------------------------------------------------- probing


def probe_video(path: str | os.PathLike, *, verify: bool = False) -> VideoInfo:
    """Read a file's frame count, rate, size and duration.

    Args:
        path: a video or image file.
        verify: decode every frame as well, so that truncated or corrupt files
            whose headers look fine are caught. The frame count is then the
            number of frames that actually decode.

    Raises:
        VideoDecodeError: the file cannot be read.
    """
    path = Path(path)
    _check_path(path)
    if is_image_path(path):
        with _open_image(path) as image:
            width, height = image.size
            if verify:
                image.load()
        return VideoInfo(str(path), 1, IMAGE_FPS, width, height, 1 / IMAGE_FPS, "image", True)
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            fps = _stream_fps(stream)
            if verify:
                num_frames = sum(1 for _ in container.decode(stream))
            else:
                num_frames = stream.frames or _count_packets(container, stream)
            if num_frames <= 0:
                raise VideoDecodeError(path, "no decodable frames", reason="corrupt")
            return VideoInfo(
                path=str(path),
                num_frames=num_frames,
                fps=fps,
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                duration=num_frames / fps,
                codec=stream.codec_context.name,
                is_image=False,
            )
    except VideoDecodeError:
        raise
    except _READ_ERRORS as error:
        raise VideoDecodeError(path, f"cannot decode: {error}") from error


def _video_stream(container, path: Path):
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream", reason="no_video_stream")
    stream = container.streams.video[0]
    if not stream.codec_context.width or not stream.codec_context.height:
        raise VideoDecodeError(path, "video stream has zero size", reason="corrupt")
    return stream


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise ValueError("stream has no frame rate")
    return float(rate)


def _count_packets(container, stream) -> int:
    """Count frames by demuxing (no decoding) for containers without a count."""
    count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    container.seek(0)
    return count


# ----------------------------------------------------------------------------- reading


def resample_indices(
    num_output: int, *, src_fps: float, dst_fps: float | None, start: int = 0
) -> list[int]:
    """Source frame indices for ``num_output`` frames played at ``dst_fps``.

    Output frame ``k`` shows the source frame on screen at time ``k / dst_fps``,
    i.e. source index ``start + floor(k * src_fps / dst_fps)``. Lower target
    rates skip frames, higher ones repeat them; ``dst_fps=None`` keeps every frame.
    """
    if num_output < 0:
        raise ValueError(f"num_output must be >= 0, got {num_output}")
    if dst_fps is None:
        return [start + k for k in range(num_output)]
    if dst_fps <= 0 or src_fps <= 0:
        raise ValueError(f"frame rates must be positive, got src={src_fps} dst={dst_fps}")
    step = src_fps / dst_fps
    return [start + math.floor(k * step + _INDEX_EPS) for k in range(num_output)]


def _output_geometry(
    width: int, height: int, size: int | tuple[int, int] | None, crop: bool
) -> tuple[int, int, tuple[int, int, int, int] | None]:
    """Scaled size and optional crop box ``(top, left, out_h, out_w)``.

    ``size`` is ``None`` (keep), an int (shorter side, aspect kept) or ``(H, W)``
    (exact; scale to cover and centre-crop when ``crop``, else stretch).
    """
    if size is None:
        return width, height, None
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        scale = size / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale)), None
    out_h, out_w = size
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if not crop:
        return out_w, out_h, None
    scale = max(out_w / width, out_h / height)
    scaled_w = max(out_w, round(width * scale))
    scaled_h = max(out_h, round(height * scale))
    top = (scaled_h - out_h) // 2
    left = (scaled_w - out_w) // 2
    return scaled_w, scaled_h, (top, left, out_h, out_w)


def _apply_crop(array: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    if box is None:
        return array
    top, left, out_h, out_w = box
    return array[..., top : top + out_h, left : left + out_w, :]


def read_video(
    path: str | os.PathLike,
    *,
    start_frame: int | None = None,
    start_time: float | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    size: int | tuple[int, int] | None = None,
    crop: bool = True,
) -> np.ndarray:
    """Decode a window of a video (or an image as one frame).

    Args:
        path: any file PyAV decodes (mp4, mkv, webm, avi, mov, gif, ...) or a
            still image (png, jpg, ...).
        start_frame: first source frame of the window (default 0).
        start_time: alternatively, the window start in seconds.
        num_frames: frames to return; ``None`` reads to the end.
        fps: output frame rate; frames are picked (not blended) as in
            :func:`resample_indices`. ``None`` keeps the source rate.
        size: ``None``, shorter side (int) or exact ``(H, W)``.
        crop: with an exact size, scale to cover and centre-crop (default) or
            stretch to the size.

    Returns:
        ``uint8`` array ``(T, H, W, 3)``, RGB.

    Raises:
        VideoTooShortError: fewer than ``num_frames`` frames are available.
        VideoDecodeError: the file cannot be read.
    """
    path = Path(path)
    if start_frame is not None and start_time is not None:
        raise ValueError("give start_frame or start_time, not both")
    if num_frames is not None and num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if (start_frame or 0) < 0 or (start_time or 0.0) < 0:
        raise ValueError("window start must be >= 0")
    _check_path(path)
    if is_image_path(path):
        return _read_image(path, num_frames=num_frames, size=size, crop=crop)
    try:
        return _read_video_window(
            path,
            start_frame=start_frame,
            start_time=start_time,
            num_frames=num_frames,
            fps=fps,
            size=size,
            crop=crop,
        )
    except VideoDecodeError:
        raise
    except _READ_ERRORS as error:
        raise VideoDecodeError(path, f"cannot decode: {error}") from error


def _read_video_window(
    path: Path,
    *,
    start_frame: int | None,
    start_time: float | None,
    num_frames: int | None,
    fps: float | None,
    size: int | tuple[int, int] | None,
    crop: bool,
) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        src_fps = _stream_fps(stream)
        first = start_frame if start_frame is not None else round((start_time or 0.0) * src_fps)
        total = stream.frames or None  # an upper bound for "read to the end"
        if num_frames is None:
            if total is None:
                total = _count_packets(container, stream)
            available = max(0, total - first)
            step = src_fps / fps if fps else 1.0
            num_frames = math.floor((available - 1) / step + _INDEX_EPS) + 1 if available else 0
            if num_frames <= 0:
                raise VideoTooShortError(
                    path, f"window starts at frame {first} of {total}", num_available=total
                )
        wanted = resample_indices(num_frames, src_fps=src_fps, dst_fps=fps, start=first)
        width, height = stream.codec_context.width, stream.codec_context.height
        scaled_w, scaled_h, box = _output_geometry(width, height, size, crop)

        origin = stream.start_time or 0
        time_base = stream.time_base
        # Float arithmetic per frame: Fraction maths costs more than decoding
        # a small frame, and rounding to the nearest index absorbs float error.
        ticks_to_index = float(time_base) * src_fps
        # One scaler for the whole window: a frame's own to_ndarray() builds a
        # new swscale context for every frame, which dominates small clips.
        scaler = VideoReformatter()
        if first > 0:
            # Seek to the key frame at or before the window; decoding forward
            # from there is exact even for streams with B-frames.
            target = origin + int(first / src_fps / time_base)
            container.seek(target, stream=stream, backward=True, any_frame=False)

        frames: list[np.ndarray] = []
        last_index = -1
        cursor = 0  # position in `wanted`
        for frame in container.decode(stream):
            if frame.pts is None:
                index = last_index + 1
            else:
                index = round((frame.pts - origin) * ticks_to_index)
            last_index = index
            if index < wanted[cursor]:
                continue
            array = scaler.reformat(
                frame, width=scaled_w, height=scaled_h, format="rgb24", interpolation="AREA"
            ).to_ndarray()
            # One decoded frame may serve several outputs (upsampled rates), and
            # a frame that a rounding gap skipped over is served by its successor.
            while cursor < len(wanted) and wanted[cursor] <= index:
                frames.append(array)
                cursor += 1
            if cursor == len(wanted):
                break
        if len(frames) < len(wanted):
            raise VideoTooShortError(
                path,
                f"asked for {len(wanted)} frames from frame {first} at "
                f"{fps or src_fps:g} fps, but only {len(frames)} decode",
                num_available=len(frames),
            )
    return _apply_crop(np.stack(frames), box)


def _open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except _READ_ERRORS as error:
        raise VideoDecodeError(path, f"cannot open image: {error}") from error


def _read_image(
    path: Path, *, num_frames: int | None, size: int | tuple[int, int] | None, crop: bool
) -> np.ndarray:
    if num_frames is not None and num_frames > 1:
        raise VideoTooShortError(
            path, f"an image is one frame, asked for {num_frames}", num_available=1
        )
    try:
        with _open_image(path) as image:
            rgb = image.convert("RGB")
            scaled_w, scaled_h, box = _output_geometry(rgb.width, rgb.height, size, crop)
            if (scaled_w, scaled_h) != rgb.size:
                rgb = rgb.resize((scaled_w, scaled_h), Image.Resampling.BOX)
            array = np.asarray(rgb, dtype=np.uint8)
    except VideoDecodeError:
        raise
    except _READ_ERRORS as error:
        raise VideoDecodeError(path, f"cannot decode image: {error}") from error
    return _apply_crop(array[None], box)


# ----------------------------------------------------------------------------- writing


def _as_uint8_frames(frames) -> np.ndarray:
    """Accept numpy or torch ``uint8`` ``(T, H, W, 3)`` and return numpy."""
    if hasattr(frames, "detach"):  # a torch tensor; no torch import needed here
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(
            f"frames must be uint8 (T, H, W, 3), got {frames.dtype}; "
            "convert with moviegen.data.transforms.to_uint8_frames"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be (T, H, W, 3) with T, H, W > 0, got {frames.shape}")
    return np.ascontiguousarray(frames)


def write_video(
    path: str | os.PathLike,
    frames,
    fps: float,
    *,
    crf: int = DEFAULT_CRF,
) -> Path:
    """Write frames to a file whose extension picks the format.

    - ``.mp4`` / ``.mov``: H.264, yuv420p, constant rate factor ``crf``
      (0-51, lower is better); height and width must be even.
    - ``.mkv``: FFV1, lossless RGB (for datasets).
    - ``.gif``: animated GIF, adaptive palette per frame, looping.
    - ``.png``: a single still frame (T must be 1).

    Args:
        path: output file; parent folders are created.
        frames: ``uint8`` ``(T, H, W, 3)`` numpy array or torch tensor.
        fps: frame rate.
        crf: H.264 quality for mp4/mov.

    Returns:
        The path written.
    """
    path = Path(path)
    frames = _as_uint8_frames(frames)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".mp4", ".mov"):
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        height, width = frames.shape[1:3]
        if height % 2 or width % 2:
            raise ValueError(
                f"H.264 yuv420p needs even height and width, got {height}x{width}; "
                "write .mkv (lossless) or .gif, or crop/pad to even sizes"
            )
        options = {"crf": str(crf), "threads": str(X264_THREADS)}
        _write_with_pyav(path, frames, fps, "libx264", "yuv420p", options)
    elif suffix == ".mkv":
        _write_with_pyav(path, frames, fps, "ffv1", "bgr0", {"threads": str(FFV1_THREADS)})
    elif suffix == ".gif":
        _write_gif(path, frames, fps)
    elif suffix in IMAGE_EXTENSIONS:
        if frames.shape[0] != 1:
            raise ValueError(f"an image file holds one frame, got {frames.shape[0]}")
        Image.fromarray(frames[0]).save(path)
    else:
        raise ValueError(
            f"cannot write {path.name!r}: use .mp4/.mov (H.264), .mkv (lossless FFV1), "
            ".gif, or an image extension for one frame"
        )
    return path


def _write_with_pyav(
    path: Path, frames: np.ndarray, fps: float, codec: str, pix_fmt: str, options: dict
) -> None:
    rate = Fraction(fps).limit_denominator(1001)
    height, width = frames.shape[1:3]
    # bitexact: no random container IDs or version strings, so equal frames give
    # equal bytes (the shapes dataset promises byte-identical output per seed).
    with av.open(str(path), mode="w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = 1 / rate
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# GIF stores frame delays in hundredths of a second.
_GIF_TICK_MS = 10


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    duration_ms = max(_GIF_TICK_MS, round(1000 / fps / _GIF_TICK_MS) * _GIF_TICK_MS)
    images = [Image.fromarray(array) for array in frames]
    images[0].save(
        path,
        save_all=True,
        append_images=images[1:],
        duration=duration_ms,
        loop=0,
        optimize=False,
        disposal=1,
    )
