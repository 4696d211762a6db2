"""TAE encode + decode speed on CPU: ours against diffusers' ``AutoencoderKLWan``.

Both autoencoders are built untrained at a matched width (see :func:`wan_kwargs`)
and run on the same random clip ``(1, 3, T, H, W)`` in fp32 under
``torch.inference_mode``, in the same process: warm-up passes first, then timed
passes taken round robin (ours, Wan, ours, Wan, ...) so that load from other users
of a shared machine hits both alike; the table gives the median over repeats of
the encode time, the decode time and their sum. Ours encodes to the posterior mean
with ``encode_moments`` and decodes with ``decode_latents``; Wan with its public
``encode(...).latent_dist.mode()`` and ``decode(...)``, which run its causal feature
cache chunk by chunk (1 + 4 + 4 ... frames), as Wan does at inference.

The two do not compress alike: ours is 8x in time and space (``ceil(T/8)`` latent
frames), Wan 2.1 is 4x in time and 8x in space (``1 + (T-1)/4`` latent frames), so
at 17 frames Wan keeps 5 latent frames to our 3. The table says so per row.

Wan needs ``T = 1 + 4k`` frames; ours takes any ``T``, so both get the same
17-frame clip by default, and speed is reported per input frame.

Ours stores its Conv3d weights as ``channels_last_3d`` by construction; Wan is timed
as diffusers ships it (contiguous) by default and, with ``--wan-layouts channels_last``,
with ours' layout too (:func:`set_conv3d_layout`). In an interleaved A/B at 17x128x128
on 2 shared cores the layout made no difference to Wan (32.0 s vs 32.3 s per clip).

At batch 1, PyTorch's CPU heuristic runs a Conv3d whose ``N*C*T*H`` is below about
20k on its slow native kernel instead of oneDNN; here that hits the low-resolution
levels of both models alike, as it would in any batch-1 CPU inference.

Usage (needs the benchmark-only dependency ``diffusers``)::

    python benchmarks/bench_tae_speed.py [--repeats 5] [--frames 17] [--size 128] \
        [--widths 32,64,128,128 64,128,256,256] [--wan-layouts contiguous channels_last] \
        [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from moviegen.tae.model import TAE, TAEConfig

# Wan 2.1 VAE (diffusers AutoencoderKLWan defaults): time 4x (two of three
# downsampling stages are temporal), space 8x.
WAN_TEMPORAL_DOWNSAMPLE = (False, True, True)
WAN_TIME_COMPRESSION = 4
SPATIAL_COMPRESSION = 8
OURS_TIME_COMPRESSION = 8
LATENT_CHANNELS = 16
DEFAULT_WIDTHS = ("32,64,128,128", "64,128,256,256")
DEFAULT_NUM_RES_BLOCKS = 2  # AutoencoderKLWan's default
# GroupNorm groups of ours: 8 keeps >= 4 channels per group at width 32.
DEFAULT_NORM_GROUPS = 8
DEFAULT_THREADS = 2
# Conv3d weight layouts Wan can be timed in.
WAN_LAYOUTS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last_3d,
}
DEFAULT_WARMUP = 1
SEED = 0


def parse_widths(text: str) -> tuple[int, int, int, int]:
    """``"32,64,128,128"`` -> ``(32, 64, 128, 128)``; every width a multiple of the first."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"widths must be 4 comma-separated ints, got {text!r}"
        ) from error
    if len(widths) != 4 or min(widths) <= 0:
        raise argparse.ArgumentTypeError(f"widths must be 4 positive ints, got {text!r}")
    if any(width % widths[0] for width in widths):
        raise argparse.ArgumentTypeError(
            f"every width must be a multiple of the first (Wan's base_dim * dim_mult), got {text!r}"
        )
    return widths  # type: ignore[return-value]


def import_wan() -> type[nn.Module]:
    """diffusers' ``AutoencoderKLWan``, with an actionable error when it is missing."""
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as error:
        raise SystemExit(
            "these benchmarks compare against diffusers' AutoencoderKLWan: "
            "`pip install -e .[bench]` (or `pip install diffusers`)"
        ) from error
    return AutoencoderKLWan


def ours_config(widths: tuple[int, ...], num_res_blocks: int, norm_groups: int) -> TAEConfig:
    """Our TAE at the given level widths, 16 latent channels, attention on."""
    return TAEConfig(
        widths=tuple(widths),
        num_res_blocks=num_res_blocks,
        norm_groups=norm_groups,
        latent_channels=LATENT_CHANNELS,
        attention=True,
    )


def wan_kwargs(widths: tuple[int, ...], num_res_blocks: int) -> dict:
    """``AutoencoderKLWan`` constructor arguments with the same level widths as ours.

    Wan's encoder levels have ``base_dim * dim_mult[i]`` channels after a
    ``base_dim``-channel input conv, exactly like our ``widths[i]`` after a
    ``widths[0]``-channel input conv; its decoder mirrors them with one more residual
    block per level, as ours does. Both have one mid block with attention
    (ours: spatial + temporal, Wan: spatial only) and no attention elsewhere.
    """
    base_dim = widths[0]
    return {
        "base_dim": base_dim,
        "dim_mult": [width // base_dim for width in widths],
        "num_res_blocks": num_res_blocks,
        "z_dim": LATENT_CHANNELS,
        "attn_scales": [],
        "temperal_downsample": list(WAN_TEMPORAL_DOWNSAMPLE),
    }


def set_conv3d_layout(model: nn.Module, layout: str) -> nn.Module:
    """Store every ``Conv3d`` weight of ``model`` in ``layout`` (``WAN_LAYOUTS``), in place.

    oneDNN follows the weight's layout, so this switches a model between the
    contiguous layout diffusers ships and the ``channels_last_3d`` layout ours uses.
    (``module.to(memory_format=...)`` fails on Wan, whose attention and resampling
    also hold 4D ``Conv2d`` weights.)
    """
    memory_format = WAN_LAYOUTS[layout]
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=memory_format)
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def build_models(
    widths: tuple[int, ...], num_res_blocks: int, norm_groups: int, seed: int = SEED
) -> tuple[TAE, nn.Module]:
    """Ours and Wan at matched width, each initialised from ``seed``."""
    wan_class = import_wan()
    torch.manual_seed(seed)
    ours = TAE(ours_config(widths, num_res_blocks, norm_groups))
    torch.manual_seed(seed)
    wan = wan_class(**wan_kwargs(widths, num_res_blocks))
    return ours, wan


def ours_codec(model: TAE) -> tuple[Callable, Callable]:
    """``(encode, decode)``: video -> posterior mean -> video."""

    def encode(video: torch.Tensor) -> torch.Tensor:
        mean, _ = TAE.split_moments(model.encode_moments(video))
        return mean

    def decode(latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        return model.decode_latents(latents, num_frames=num_frames)

    return encode, decode


def wan_codec(model: nn.Module) -> tuple[Callable, Callable]:
    """``(encode, decode)`` through Wan's public API (posterior mode, clamped output)."""

    def encode(video: torch.Tensor) -> torch.Tensor:
        return model.encode(video).latent_dist.mode()

    def decode(latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        del num_frames  # Wan's decoder fixes it: 1 + 4 (T' - 1)
        return model.decode(latents).sample

    return encode, decode


def time_pass(encode: Callable, decode: Callable, video: torch.Tensor) -> dict:
    """Seconds of one encode and one decode of ``video``, and the latent shape."""
    with torch.inference_mode():
        start = time.perf_counter()
        latents = encode(video)
        middle = time.perf_counter()
        reconstruction = decode(latents, video.shape[2])
        end = time.perf_counter()
    if reconstruction.shape != video.shape:
        raise RuntimeError(
            f"reconstruction {tuple(reconstruction.shape)} != input {tuple(video.shape)}"
        )
    return {"encode_s": middle - start, "decode_s": end - middle, "latent_shape": latents.shape}


def time_interleaved(
    codecs: list[tuple[Callable, Callable, torch.Tensor]], *, warmup: int, repeats: int
) -> list[dict]:
    """Median encode, decode and total seconds of each ``(encode, decode, video)``.

    Each gets ``warmup`` untimed passes; then the timed passes go round robin, so
    a change in load from the other users of a shared machine hits all alike.
    """
    for encode, decode, video in codecs:
        for _ in range(warmup):
            time_pass(encode, decode, video)
    runs: list[list[dict]] = [[] for _ in codecs]
    for _ in range(repeats):
        for index, (encode, decode, video) in enumerate(codecs):
            runs[index].append(time_pass(encode, decode, video))
    results = []
    for passes in runs:
        totals = [run["encode_s"] + run["decode_s"] for run in passes]
        results.append(
            {
                "latent_shape": tuple(passes[-1]["latent_shape"]),
                "encode_s": statistics.median(run["encode_s"] for run in passes),
                "decode_s": statistics.median(run["decode_s"] for run in passes),
                "total_s": statistics.median(totals),
                "total_runs_s": totals,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (median)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed passes")
    parser.add_argument("--size", type=int, default=128, help="frame height and width")
    parser.add_argument("--frames", type=int, default=17, help="clip length (Wan: 1 + 4k)")
    parser.add_argument(
        "--widths",
        type=parse_widths,
        nargs="+",
        default=[parse_widths(text) for text in DEFAULT_WIDTHS],
        help="our level widths, one set per comparison (Wan: base_dim = first, "
        "dim_mult = widths / first)",
    )
    parser.add_argument("--num-res-blocks", type=int, default=DEFAULT_NUM_RES_BLOCKS)
    parser.add_argument("--norm-groups", type=int, default=DEFAULT_NORM_GROUPS)
    parser.add_argument(
        "--wan-layouts",
        nargs="+",
        choices=sorted(WAN_LAYOUTS),
        default=["contiguous"],
        help="Conv3d weight layouts to time Wan in: contiguous (as diffusers ships it) "
        "and/or channels_last (as ours); ours/Wan uses the fastest",
    )
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--json", action="store_true", help="print results as JSON too")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.frames < 1 or (args.frames - 1) % WAN_TIME_COMPRESSION:
        parser.error(f"--frames must be 1 + 4k for Wan (5, 9, 17, 33, ...), got {args.frames}")
    if args.size < SPATIAL_COMPRESSION or args.size % SPATIAL_COMPRESSION:
        parser.error(f"--size must be a positive multiple of {SPATIAL_COMPRESSION}")
    for widths in args.widths:
        if any(width % args.norm_groups for width in widths):
            parser.error(f"--norm-groups {args.norm_groups} must divide every width {widths}")
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(SEED)
    video = torch.rand(1, 3, args.frames, args.size, args.size, generator=generator) * 2 - 1
    results = []
    for widths in args.widths:
        ours, wan = build_models(widths, args.num_res_blocks, args.norm_groups)
        wan_constructor = f"AutoencoderKLWan(**{wan_kwargs(widths, args.num_res_blocks)})"
        # (name, model, time compression, constructor, input); one Wan copy per layout.
        variants = [("ours", ours, OURS_TIME_COMPRESSION, repr(ours.config), video)]
        for index, layout in enumerate(dict.fromkeys(args.wan_layouts)):
            model = set_conv3d_layout(wan if index == 0 else copy.deepcopy(wan), layout)
            clip = video.contiguous(memory_format=WAN_LAYOUTS[layout])
            variants.append(
                (f"wan2.1 {layout}", model, WAN_TIME_COMPRESSION, wan_constructor, clip)
            )
        codecs = []
        for name, model, *_, clip in variants:
            model.eval()
            encode, decode = ours_codec(model) if name == "ours" else wan_codec(model)
            codecs.append((encode, decode, clip))
        timings = time_interleaved(codecs, warmup=args.warmup, repeats=args.repeats)
        rows = []
        for (name, model, time_factor, constructor, _), timing in zip(
            variants, timings, strict=True
        ):
            rows.append(
                {
                    "model": name,
                    "widths": list(widths),
                    "constructor": constructor,
                    "params": count_parameters(model),
                    "compression": f"t{time_factor}x s{SPATIAL_COMPRESSION}x",
                    "frames_per_s": args.frames / timing["total_s"],
                    **timing,
                }
            )
        fastest_wan = max(row["frames_per_s"] for row in rows[1:])
        rows[0]["ours_over_wan"] = rows[0]["frames_per_s"] / fastest_wan
        results.extend(rows)
        del ours, wan, variants, codecs

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads, torch {torch.__version__}, fp32, inference_mode; "
        f"input 1x3x{args.frames}x{args.size}x{args.size} (same clip for both); "
        f"medians of {args.repeats} interleaved runs after {args.warmup} warm-up"
    )
    print(
        "ours compresses time 8x and space 8x; Wan 2.1 (AutoencoderKLWan) compresses "
        "time 4x and space 8x, so it keeps about twice the latent frames. "
        "ours/Wan = frames/s ratio against the fastest Wan layout."
    )
    print(
        "| model | widths | params (M) | compression | latent CxTxHxW | encode s | decode s "
        "| total s | frames/s | ours/Wan |"
    )
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|")
    for row in results:
        ratio = f"{row['ours_over_wan']:.2f}x" if "ours_over_wan" in row else ""
        latent = "x".join(str(dim) for dim in row["latent_shape"][1:])
        print(
            f"| {row['model']} | {','.join(map(str, row['widths']))} | {row['params'] / 1e6:.2f} "
            f"| {row['compression']} | {latent} | {row['encode_s']:.3f} | {row['decode_s']:.3f} "
            f"| {row['total_s']:.3f} | {row['frames_per_s']:.2f} | {ratio} |"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
