"""Text-to-video training throughput on a GPU: tokens/s and MFU under FSDP2, bf16, compile, AC.

The ``TextToVideoModel`` of ``--recipe`` (default ``1B``) is built the way the
distributed trainer builds it (``build_parallel_model``: meta device, per-block
activation checkpointing and ``torch.compile``, FSDP2 ``fully_shard`` per block
and root, bf16 compute with fp32 master weights and fp32 gradient reduction)
and trained on one fixed random batch: forward, fp32 MSE to a random velocity
target, backward, ``AdamW.step()``, ``zero_grad``. After ``--warmup`` untimed
steps (compilation happens there) the median of ``--steps`` timed steps gives:

- **tokens/s** per GPU: ``batch * video tokens / step`` (video tokens after
  patchifying, :func:`moviegen.transformer.num_video_tokens`; text tokens not
  counted);
- **MFU**: ``train_step_flops(config, N, L) * batch`` (matmuls only, backward =
  2x forward, the recomputation of activation checkpointing *not* counted)
  per second over ``--peak-tflops`` (default: H100 SXM bf16 dense, 989 TFLOP/s;
  on CPU the measured fp32 matmul FLOP/s of this machine);
- peak GPU memory allocated and reserved.

Defaults: 256 px (32 x 32 latent) x 32 latent frames -> 8,192 video tokens,
batch 1, 640 text tokens of width 4096 (UL2), full AC, compile on. One GPU
(world size 1) unless launched with ``torchrun --nproc-per-node N``, then FSDP2
shards over the N GPUs and tokens/s is per GPU.

Usage::

    python benchmarks/gpu_t2v_throughput.py [--recipe 1B] [--frames 32] [--size 256] \
        [--batch 1] [--text-tokens 640] [--text-dim 4096] [--ac full|selective|none] \
        [--selective-option 2|op] [--compile | --no-compile] [--param-dtype auto] \
        [--warmup 3] [--steps 10] [--peak-tflops 989] [--device cuda] [--json]

    # the same code path on a CPU, in seconds:
    python benchmarks/gpu_t2v_throughput.py --device cpu --recipe debug --frames 2 --size 32 \
        --text-tokens 8 --text-dim 16 --no-compile --warmup 1 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

from moviegen.distributed import ParallelConfig, build_mesh, build_parallel_model
from moviegen.distributed.mesh import AC_MODES, PARAM_DTYPES, SELECTIVE_OP
from moviegen.distributed.planner import H100_BF16_DENSE_FLOPS
from moviegen.pipeline.sample import TAE_COMPRESSION
from moviegen.train.throughput import measure_matmul_flops, model_flops_utilisation
from moviegen.transformer import (
    TRANSFORMER_RECIPES,
    num_video_tokens,
    train_step_flops,
    transformer_recipe,
)
from moviegen.transformer.conditioned import TextToVideoModel
from moviegen.transformer.summary import format_count

DEFAULT_RECIPE = "1B"
DEFAULT_FRAMES = 32  # latent frames (256 video frames)
DEFAULT_SIZE = 256  # pixels, square
DEFAULT_BATCH = 1
DEFAULT_TEXT_TOKENS = 640  # UL2 + MetaCLIP at 256, ByT5 at 128 (as moviegen.transformer.summary)
DEFAULT_TEXT_DIM = 4096  # UL2's width
DEFAULT_WARMUP = 3
DEFAULT_STEPS = 10
DEFAULT_AC = "full"
TERA = 1e12
LEARNING_RATE = 1e-4
SEED = 0
TEXT_NAME = "text"
# t is drawn uniformly from [T_MARGIN, 1 - T_MARGIN], inside the open interval (0, 1).
T_MARGIN = 0.01


def parse_selective_option(text: str) -> int | str:
    if text == SELECTIVE_OP:
        return text
    try:
        return int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--selective-option must be an int k or {SELECTIVE_OP!r}, got {text!r}"
        ) from error


def init_distributed(device_type: str) -> tuple[int, int, torch.device]:
    """Join torchrun's group if launched by it, else a 1-rank group; (rank, world, device)."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(device_type, local_rank) if device_type == "cuda" else None
        if device is not None:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    else:
        if device_type == "cuda":
            torch.cuda.set_device(0)
        # One rank needs no rendezvous: an in-memory store, no port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = (
        torch.device(device_type, torch.cuda.current_device())
        if device_type == "cuda"
        else (torch.device("cpu"))
    )
    return dist.get_rank(), dist.get_world_size(), device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(
    args: argparse.Namespace, latent: tuple[int, int, int], channels: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A fixed random flow-matching batch (fp32 latents, as the trainer feeds them)."""
    generator = torch.Generator().manual_seed(SEED)
    shape = (args.batch, channels, *latent)
    x1, x0 = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    t = T_MARGIN + (1 - 2 * T_MARGIN) * torch.rand(args.batch, generator=generator)
    expand = t[:, None, None, None, None]
    tensors = {
        "xt": expand * x1 + (1 - expand) * x0,
        "t": t,
        "target": x1 - x0,
        "hidden": torch.randn(args.batch, args.text_tokens, args.text_dim, generator=generator),
        "mask": torch.ones(args.batch, args.text_tokens, dtype=torch.bool),
    }
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def run(args: argparse.Namespace) -> dict:
    rank, world_size, device = init_distributed(args.device)
    try:
        config = transformer_recipe(args.recipe)
        latent = (args.frames, args.size // TAE_COMPRESSION, args.size // TAE_COMPRESSION)
        for axis, size, limit in zip(
            ("frames", "height", "width"), latent, config.max_latent_sizes, strict=True
        ):
            if size > limit:
                raise SystemExit(
                    f"latent {axis} {size} exceeds the {args.recipe} recipe's position table "
                    f"({limit} latent units); pass a smaller --frames/--size"
                )
        tokens = num_video_tokens(config, latent)
        parallel = ParallelConfig(
            activation_checkpointing=args.ac,
            selective_ac_option=args.selective_option,
            compile=args.compile,
            param_dtype=args.param_dtype,
        )
        mesh = build_mesh(parallel, world_size, device.type)
        model = build_parallel_model(
            lambda: TextToVideoModel(config, {TEXT_NAME: args.text_dim}),
            mesh,
            parallel,
            device,
            seed=SEED,
        )
        num_params = sum(p.numel() for p in model.parameters())  # global sizes of the shards
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
        data = make_batch(args, latent, config.latent_channels, device)
        text = {TEXT_NAME: (data["hidden"], data["mask"])}

        def step() -> float:
            synchronize(device)
            start = time.perf_counter()
            prediction = model(data["xt"], data["t"], text)
            loss = (prediction.float() - data["target"]).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            return time.perf_counter() - start

        warmup_seconds = [step() for _ in range(args.warmup)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = [step() for _ in range(args.steps)]
        step_s = statistics.median(seconds)

        if args.peak_tflops is not None:
            peak, peak_source = args.peak_tflops * TERA, "--peak-tflops"
        elif device.type == "cuda":
            peak, peak_source = H100_BF16_DENSE_FLOPS, "H100 SXM bf16 dense"
        else:
            peak, peak_source = measure_matmul_flops(device=device), "measured fp32 matmul"
        flops = train_step_flops(config, tokens, args.text_tokens) * args.batch
        result = {
            "rank": rank,
            "world_size": world_size,
            "recipe": args.recipe,
            "params": num_params,
            "latent": list(latent),
            "video_tokens": tokens,
            "compute_dtype": str(parallel.compute_dtype(device.type)).removeprefix("torch."),
            "step_s": step_s,
            "step_runs_s": seconds,
            "warmup_s": warmup_seconds,
            "tokens_per_s_per_gpu": args.batch * tokens / step_s,
            "flops_per_step": flops,
            "achieved_tflops": flops / step_s / TERA,
            "peak_tflops": peak / TERA,
            "peak_source": peak_source,
            "mfu": model_flops_utilisation(flops, step_s, peak),
        }
        if device.type == "cuda":
            result["max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            result["max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            result["gpu"] = torch.cuda.get_device_name(device)
        return result
    finally:
        dist.destroy_process_group()


def print_report(args: argparse.Namespace, result: dict) -> None:
    device = result.get("gpu", f"CPU ({platform.processor() or platform.machine()})")
    print(
        f"{result['recipe']} ({format_count(result['params'])} params incl. text projection) "
        f"on {result['world_size']} x {device}, torch {torch.__version__}; latent "
        f"{'x'.join(map(str, result['latent']))} ({args.size} px, {args.frames} latent frames) "
        f"-> {result['video_tokens']} video tokens, batch {args.batch}, {args.text_tokens} text "
        f"tokens of width {args.text_dim}; {result['compute_dtype']} compute, fp32 reduce; "
        f"AC {args.ac}"
        + (f" ({args.selective_option})" if args.ac == "selective" else "")
        + f", compile {'on' if args.compile else 'off'}; median of {args.steps} steps after "
        f"{args.warmup} warm-up"
    )
    print(
        "| step s | tokens/s/GPU | TFLOP/step | achieved TFLOP/s | peak TFLOP/s | MFU | "
        "max alloc GiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    allocated = result.get("max_allocated_gib")
    print(
        f"| {result['step_s']:.4f} | {result['tokens_per_s_per_gpu']:.0f} "
        f"| {result['flops_per_step'] / TERA:.2f} | {result['achieved_tflops']:.2f} "
        f"| {result['peak_tflops']:.1f} ({result['peak_source']}) | {result['mfu']:.1%} "
        f"| {'-' if allocated is None else f'{allocated:.1f}'} |"
    )
    print(
        "MFU counts model FLOPs (3x forward, matmuls only); activation checkpointing's "
        "recomputation is extra work it does not credit."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=TRANSFORMER_RECIPES)
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="latent frames")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="square frame, pixels")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="samples per GPU")
    parser.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS)
    parser.add_argument("--text-dim", type=int, default=DEFAULT_TEXT_DIM)
    parser.add_argument("--ac", default=DEFAULT_AC, choices=AC_MODES, help="activation ckpt")
    parser.add_argument(
        "--selective-option",
        type=parse_selective_option,
        default=2,
        help=f"with --ac selective: checkpoint every k-th block, or {SELECTIVE_OP!r} per operator",
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="per block"
    )
    parser.add_argument("--param-dtype", default="auto", choices=tuple(PARAM_DTYPES))
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed steps")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="timed steps (median)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=f"peak for MFU (default: {H100_BF16_DENSE_FLOPS / TERA:g} on CUDA, H100 bf16 "
        "dense; on CPU the measured fp32 matmul rate)",
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args()
    for name in ("frames", "size", "batch", "text_tokens", "text_dim", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.size % TAE_COMPRESSION:
        parser.error(f"--size must be a multiple of the TAE compression {TAE_COMPRESSION}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error("--peak-tflops must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "this benchmark needs a CUDA GPU and none is available "
            f"(torch {torch.__version__}); to check the code path on a CPU, run with "
            "--device cpu --recipe debug --frames 2 --size 32 --no-compile"
        )
    result = run(args)
    if result["rank"] == 0:
        print_report(args, result)
        if args.json:
            print(json.dumps({"settings": vars(args), "result": result}))


if __name__ == "__main__":
    main()
