"""Tiled TAE inference: parity with whole-clip inference, and flat memory.

1. Parity on a 96-frame clip: tiled encoding (one 32-frame chunk at a time)
   against whole-clip encoding (max abs difference), and tiled decoding (4
   latent frames per tile, 2 overlapping, linear cross-fade) against
   whole-clip decoding (PSNR between the two decodes).
2. Peak memory of tiled decoding for 32 and 256 frames. Each measurement runs
   in a fresh process; on CPU it is the peak resident set size above the
   process's size before decoding (Linux ``/proc/self/status``), on CUDA
   ``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/bench_tae_tiling.py [--checkpoint runs/demo/tae] [--size 64]

Without ``--checkpoint`` a randomly initialised ``cpu``-recipe TAE is used
(parity then says little about a trained decoder; pass a trained run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from moviegen.data.shapes import ShapeAttributes, render_clip
from moviegen.eval.metrics import psnr
from moviegen.tae.checkpoint import load_tae
from moviegen.tae.model import TAE, tae_recipe
from moviegen.tae.tiling import decode_tiled

PARITY_FRAMES = 96
MEMORY_FRAMES = (32, 256)


def load_model(checkpoint: str | None) -> TAE:
    if checkpoint:
        return load_tae(checkpoint)
    torch.manual_seed(0)
    return TAE(tae_recipe("cpu")).eval()


def shapes_clip(num_frames: int, size: int) -> torch.Tensor:
    """A long shapes clip: a large object crossing the frame (1, 3, T, H, W)."""
    attributes = ShapeAttributes(size="large", colour="cyan", shape="circle", direction="right")
    frames, _ = render_clip(
        attributes, size=size, num_frames=num_frames, rng=np.random.default_rng(0)
    )
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float()[None] / 127.5 - 1


@torch.no_grad()
def parity(model: TAE, size: int) -> dict:
    video = shapes_clip(PARITY_FRAMES, size)
    whole = model.encode_moments(video)
    tiled = model.encode_moments(video, chunks_at_once=1)
    mean, _ = model.split_moments(whole)
    decoded_whole = model.decode_latents(mean, num_frames=PARITY_FRAMES).clamp(-1, 1)
    decoded_tiled = decode_tiled(model.decode_latents, mean, num_frames=PARITY_FRAMES).clamp(-1, 1)
    return {
        "encode_max_abs_diff": float((whole - tiled).abs().max()),
        "decode_psnr_tiled_vs_whole_db": float(psnr(decoded_tiled, decoded_whole)[0]),
        "reconstruction_psnr_db": float(psnr(decoded_whole, video)[0]),
    }


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_child(checkpoint: str | None, num_frames: int, size: int) -> None:
    """Runs in a fresh process: decode ``num_frames`` tiled, print peak bytes."""
    model = load_model(checkpoint)
    latents = torch.randn(1, 16, -(-num_frames // 8), size // 8, size // 8)
    if torch.cuda.is_available():
        model, latents = model.cuda(), latents.cuda()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            decode_tiled(model.decode_latents, latents, num_frames=num_frames)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
        base = _rss_kib("VmRSS")
        with torch.no_grad():
            decode_tiled(model.decode_latents, latents, num_frames=num_frames)
        peak = (_rss_kib("VmHWM") - base) * 1024
    print(json.dumps({"frames": num_frames, "peak_bytes": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="trained TAE run (recommended)")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels")
    parser.add_argument("--memory-size", type=int, default=128, help="frame side for memory")
    parser.add_argument("--child-frames", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child_frames is not None:
        measure_memory_child(args.checkpoint, args.child_frames, args.memory_size)
        return
    results = parity(load_model(args.checkpoint), args.size)
    peaks = {}
    for num_frames in MEMORY_FRAMES:
        command = [
            sys.executable,
            __file__,
            "--child-frames",
            str(num_frames),
            "--memory-size",
            str(args.memory_size),
        ]
        if args.checkpoint:
            command += ["--checkpoint", args.checkpoint]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks[num_frames] = json.loads(output.strip().splitlines()[-1])["peak_bytes"]
    results["peak_mib"] = {frames: peak / 2**20 for frames, peak in peaks.items()}
    results["peak_ratio_256_vs_32"] = peaks[256] / peaks[32]
    print(f"model: {args.checkpoint or 'random cpu recipe'}")
    print("| measure | value |\n|---|---|")
    print(
        f"| tiled vs whole encoding, max abs diff ({PARITY_FRAMES} frames) | "
        f"{results['encode_max_abs_diff']:.2e} |"
    )
    print(f"| tiled vs whole decoding, PSNR | {results['decode_psnr_tiled_vs_whole_db']:.2f} dB |")
    print(f"| reconstruction PSNR (whole) | {results['reconstruction_psnr_db']:.2f} dB |")
    for frames, mib in results["peak_mib"].items():
        print(
            f"| peak memory, tiled decode of {frames} frames at {args.memory_size}px | {mib:.1f} MiB |"
        )
    print(f"| peak ratio 256 / 32 frames | {results['peak_ratio_256_vs_32']:.2f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
