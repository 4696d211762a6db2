"""Data-loading throughput: the shapes loader, and windowed reads of real clips.

Measures, as medians over repeats:

1. shapes loader: 16-frame 64x64 shapes clips per second through the bucketed
   DataLoader with 0 and 2 worker processes;
2. real-clip windows: 32-frame 128x128 windows out of real clips, read with
   :func:`moviegen.data.video_io.read_video` (seek + decode only the window +
   resize inside FFmpeg's scaler) against the naive path (decode the whole file
   at full size, slice the window, resize with torch).

Usage::

    python benchmarks/bench_data.py [--real-data ../shared/data/real] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from moviegen.data.buckets import BucketSpec
from moviegen.data.dataset import VideoTextDataset, build_loader
from moviegen.data.shapes import generate_shapes_dataset
from moviegen.data.video_io import probe_video, read_video

SHAPES_CLIPS = 256
SHAPES_BATCH = 8
WINDOW_FRAMES = 32
WINDOW_SIZE = (128, 128)
DEFAULT_REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _median_rate(run, repeats: int) -> tuple[float, list[float]]:
    """``run()`` returns an item count; the median of items/second over repeats."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates), rates


def bench_shapes(work_dir: Path, repeats: int) -> list[dict]:
    data_dir = work_dir / "shapes"
    if not (data_dir / "train.jsonl").is_file():
        generate_shapes_dataset(data_dir, num_clips=SHAPES_CLIPS, val_fraction=0.0, progress=False)
    dataset = VideoTextDataset(data_dir / "train.jsonl", num_frames=16, size=(64, 64))
    spec = BucketSpec(sizes=((64, 64),), frame_counts=(16,), default_batch_size=SHAPES_BATCH)
    results = []
    for num_workers in (0, 2):

        def run(num_workers=num_workers) -> int:
            loader, _ = build_loader(dataset, spec, num_workers=num_workers)
            return sum(batch["video"].shape[0] for batch in loader)

        median, rates = _median_rate(run, repeats)
        results.append(
            {
                "benchmark": "shapes loader 16x64x64",
                "variant": f"{num_workers} workers",
                "clips_per_s": median,
                "runs": rates,
            }
        )
    return results


def _decode_whole_then_slice(path: Path, start: int) -> torch.Tensor:
    """The naive path: every frame at full size, then slice and resize in torch."""
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    clip = torch.from_numpy(np.stack(frames[start : start + WINDOW_FRAMES]))
    clip = clip.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    height, width = clip.shape[-2:]
    scale = max(WINDOW_SIZE[0] / height, WINDOW_SIZE[1] / width)
    resized = F.interpolate(
        clip,
        size=(round(height * scale), round(width * scale)),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    top = (resized.shape[-2] - WINDOW_SIZE[0]) // 2
    left = (resized.shape[-1] - WINDOW_SIZE[1]) // 2
    return resized[..., top : top + WINDOW_SIZE[0], left : left + WINDOW_SIZE[1]]


def bench_real(real_dir: Path, repeats: int) -> list[dict]:
    groups = {
        "640x480 phone clips (32 of 32 frames)": sorted(real_dir.glob("IMG_*.mp4")),
        "bikes.mp4 640x272 (32 of 250 frames)": [real_dir / "bikes.mp4"],
    }
    results = []
    for name, paths in groups.items():
        paths = [path for path in paths if path.is_file()]
        if not paths:
            continue
        windows = []
        rng = np.random.default_rng(0)
        for path in paths:
            total = probe_video(path).num_frames
            # Eight windows per file, at random starts where the file allows.
            starts = rng.integers(0, total - WINDOW_FRAMES + 1, size=8)
            windows.extend((path, int(start)) for start in starts)

        def windowed(windows=windows) -> int:
            for path, start in windows:
                read_video(path, start_frame=start, num_frames=WINDOW_FRAMES, size=WINDOW_SIZE)
            return len(windows)

        def whole(windows=windows) -> int:
            for path, start in windows:
                _decode_whole_then_slice(path, start)
            return len(windows)

        fast, fast_runs = _median_rate(windowed, repeats)
        slow, slow_runs = _median_rate(whole, repeats)
        results.append(
            {
                "benchmark": name,
                "variant": "read_video window",
                "clips_per_s": fast,
                "runs": fast_runs,
                "speedup": fast / slow,
            }
        )
        results.append(
            {
                "benchmark": name,
                "variant": "decode whole + slice",
                "clips_per_s": slow,
                "runs": slow_runs,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--real-data",
        type=Path,
        default=Path(os.environ.get("MOVIEGEN_REAL_DATA", DEFAULT_REAL_DATA)),
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=None, help="keeps generated data")
    parser.add_argument("--json", action="store_true", help="print results as JSON too")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = args.work_dir or Path(temporary)
        results = bench_shapes(work_dir, args.repeats)
        if args.real_data.is_dir():
            results += bench_real(args.real_data, args.repeats)
        else:
            print(f"real clips not found at {args.real_data}: skipping the window benchmark")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, PyAV {av.__version__}; medians of {args.repeats} runs"
    )
    print(f"| {'benchmark':<40} | {'variant':<22} | {'clips/s':>8} | {'speed-up':>8} |")
    print(f"|{'-' * 42}|{'-' * 24}|{'-' * 10}|{'-' * 10}|")
    for row in results:
        ratio = f"{row['speedup']:.2f}x" if "speedup" in row else ""
        print(
            f"| {row['benchmark']:<40} | {row['variant']:<22} | "
            f"{row['clips_per_s']:>8.1f} | {ratio:>8} |"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
