"""The TAE's temporal convolutions on CPU: a 3D convolution against the same as 2D.

Every ``(3, 1, 1)`` temporal convolution of the TAE (:func:`moviegen.tae.model.temporal_conv`)
runs as a 2D convolution with kernel ``(3, 1)`` over ``(T, H * W)``: the same
numbers, but oneDNN's 3D kernels are slow for this shape on CPU. This script
times both ways, interleaved (3D, 2D, 3D, 2D, ...) so that load from other
users of the machine hits both alike, and reports medians:

- each layer shape of a ``cpu``-recipe training step (batch 4, 16 frames,
  32 px crops), forward + backward;
- the whole training step of the ``cpu`` TAE (reconstruction MSE, backward,
  AdamW) on a video batch of that shape, with every temporal convolution
  switched between the two implementations.

Usage::

    python benchmarks/bench_tae_temporal_conv.py [--repeats 15] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import moviegen.tae.model as tae_model
from moviegen.tae.model import TAE, tae_recipe

# (channels in, channels out, frames, side, stride) of the cpu recipe's
# temporal convolutions on a 32 px x 16 frame training crop.
LAYERS = [(16, 16, 16, 32, 1), (32, 32, 8, 16, 1), (64, 64, 4, 8, 1), (32, 32, 16, 16, 2)]
BATCH, FRAMES, CROP = 4, 16, 32


def conv3d_reference(x: torch.Tensor, conv: torch.nn.Conv3d) -> torch.Tensor:
    """The plain way: replicate-pad in time, then the ``nn.Conv3d``."""
    return conv(F.pad(x, (0, 0, 0, 0, 1, 1), mode="replicate"))


def interleaved(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed round robin after two warm-ups."""
    for function in functions.values():
        function()
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def layer_rows(repeats: int) -> list[dict]:
    rows = []
    for channels_in, channels_out, frames, side, stride in LAYERS:
        torch.manual_seed(0)
        conv = torch.nn.Conv3d(channels_in, channels_out, (3, 1, 1), stride=(stride, 1, 1))
        x = torch.randn(BATCH, channels_in, frames, side, side)
        x = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()

        def run(implementation, conv=conv, x=x):
            implementation(x, conv).square().sum().backward()

        torch.testing.assert_close(
            tae_model.temporal_conv(x, conv), conv3d_reference(x, conv), rtol=1e-4, atol=1e-4
        )
        medians = interleaved(
            {
                "conv3d": lambda run=run: run(conv3d_reference),
                "conv2d": lambda run=run: run(tae_model.temporal_conv),
            },
            repeats,
        )
        rows.append(
            {
                "what": f"layer {channels_in}->{channels_out} ch, {frames}x{side}x{side}"
                + (", stride 2" if stride > 1 else ""),
                **medians,
            }
        )
    return rows


def step_row(repeats: int) -> dict:
    torch.manual_seed(0)
    tae = TAE(tae_recipe("cpu"))
    optimizer = torch.optim.AdamW(tae.parameters(), lr=1e-5)
    video = torch.rand(BATCH, 3, FRAMES, CROP, CROP) * 2 - 1
    fast = tae_model.temporal_conv

    def step(implementation) -> None:
        tae_model.temporal_conv = implementation
        try:
            reconstruction = tae(video, sample=False)[0]
            F.mse_loss(reconstruction, video).backward()
            optimizer.step()
            optimizer.zero_grad()
        finally:
            tae_model.temporal_conv = fast

    medians = interleaved(
        {"conv3d": lambda: step(conv3d_reference), "conv2d": lambda: step(fast)}, repeats
    )
    return {"what": f"cpu TAE training step, {BATCH}x{FRAMES}x{CROP}x{CROP}", **medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [*layer_rows(args.repeats), step_row(max(3, args.repeats // 3))]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.threads} threads, medians (forward + backward)")
    print("| what | Conv3d ms | as Conv2d ms | speed-up |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['what']} | {1e3 * row['conv3d']:.1f} | {1e3 * row['conv2d']:.1f} "
            f"| {row['conv3d'] / row['conv2d']:.2f}x |"
        )


if __name__ == "__main__":
    main()
