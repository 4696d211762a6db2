"""Text-to-video transformer speed: a training step against diffusers' Wan 2.1, MFU, sampling.

Three measurements, in fp32 on the CPU by default (``--device cuda`` also works):

1. **Training step.** Our ``TextToVideoModel`` (text projection + transformer) and
   diffusers' ``WanTransformer3DModel`` are built untrained at the same width,
   depth, heads, token count and text width (see :func:`ours_config` and
   :func:`wan_kwargs`) and trained on the same random batch: forward, MSE to a
   fixed random target, backward, ``AdamW.step()`` and ``zero_grad``. Ours is
   called as ``model(x, t, {"text": (hidden, mask)})`` with ``t`` in ``(0, 1)``
   and an all-True mask; Wan as ``model(hidden_states=x, timestep=1000 t,
   encoder_hidden_states=hidden, return_dict=False)[0]``. After ``--warmup``
   untimed steps each, the timed steps go round robin, one step of every model
   per round (the order reversed every other round), so that load from other
   users of a shared machine hits all alike; the table gives the median over ``--repeats`` of the step time, tokens/s
   (``batch * video tokens / step``) and the ratio Wan / ours of the step times
   (above 1: ours is faster).
2. **MFU.** ``train_step_flops(config, N, L) * batch`` over the median step
   time, divided by the fp32 matmul FLOP/s of this machine
   (``measure_matmul_flops``), measured once per round inside the same round
   robin (median over rounds): utilisation of the *practical* peak, not a
   vendor's. Wan's FLOPs are counted by :func:`wan_train_step_flops` in the
   same convention (matmuls only, ``2 m n k``, backward = 2x forward, text
   projection left out on both sides).
3. **Sampling.** With ``--t2v-checkpoint RUN`` (e.g. ``runs/demo/t2v``), one
   16-frame 64x64 video through ``TextToVideoPipeline.from_checkpoint(RUN)`` at
   50 steps and CFG 7.5, split into its stages (encode the prompt and the
   negative prompt, solve, TAE decode); median of ``--repeats`` after one
   warm-up video. Without it, the ``tiny`` recipe is built untrained and only
   the 50-step CFG solve (``generate_latents``) is timed on a ``(16, 2, 8, 8)``
   latent with 12 random text tokens of width 384; the output says which.

What is matched, and what is not (the two are different architectures):

- Same: width, depth, heads (so head dim), patch ``(1, 2, 2)``, 16 latent
  channels, sinusoidal timestep features of width 256 into a 2-layer MLP and a
  shared ``Linear(D, 6 D)`` modulation plus a per-block ``(6, D)`` table, a
  modulated final norm, a pre-norm with a weight before cross-attention
  (Wan: ``cross_attn_norm=True``, its default), and QK-norm: Wan always
  normalises queries and keys (its ``qk_norm`` argument is accepted but unused
  in diffusers 0.42), so ours runs with ``qk_norm=True`` unless ``--no-qk-norm``.
- Different: ours is SwiGLU (three ``D x F`` matrices), Wan a GELU-tanh MLP
  (two), so at the same FFN width ours has 1.5x the FFN parameters and FLOPs.
  By default Wan is therefore timed twice: at ``--ffn`` (same FFN width) and at
  ``1.5 * --ffn`` (about the same parameters and FLOPs as ours); ``--wan-ffn``
  picks the widths. Ours has no biases, RMSNorm and a per-head QK-norm; Wan has
  biases on every linear, LayerNorm (upcast to fp32, a no-op here) and an
  RMSNorm over all heads together. Positions: ours adds learned factorised
  absolute tables (a few ``D``-wide rows of parameters); Wan applies 3D RoPE to
  queries and keys in every layer (float64 tables, no parameters). Text: ours
  ``Linear + LayerNorm`` into ``D``, Wan ``Linear -> GELU -> Linear``. Ours
  masks text keys in cross-attention (all True here), Wan takes no mask.

Usage (needs the benchmark-only dependency ``diffusers``)::

    python benchmarks/bench_t2v_speed.py [--dim 256] [--heads 4] [--layers 4] [--ffn 1024] \
        [--wan-ffn 1024 1536] [--latent 16,4,16] [--text-tokens 32] [--batch 2] \
        [--warmup 2] [--repeats 5] [--threads 2] [--device cpu] \
        [--t2v-checkpoint runs/demo/t2v] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moviegen.data.precompute import repeat_text_features
from moviegen.pipeline.sample import (
    SamplingOptions,
    TextToVideoPipeline,
    generate_latents,
    latent_shape_for,
)
from moviegen.train.throughput import measure_matmul_flops
from moviegen.transformer import (
    TransformerConfig,
    num_video_tokens,
    train_step_flops,
    transformer_recipe,
)
from moviegen.transformer.blocks import NUM_MODULATIONS
from moviegen.transformer.conditioned import TextToVideoModel

LATENT_CHANNELS = 16
PATCH_SIZE = (1, 2, 2)
# Width of the precomputed text features (MiniLM-L6, the CPU default encoder).
TEXT_DIM = 384
TEXT_NAME = "text"
# Wan's timestep argument is on the 0..1000 scale; ours is t in (0, 1).
WAN_TIMESTEP_SCALE = 1000.0
# Wan's default sinusoidal timestep width; ours (``timestep_embed_dim``) matches it.
FREQ_DIM = 256
# SwiGLU has three D x F matrices, a GELU MLP two: this Wan FFN width has our parameters.
SWIGLU_TO_GELU = 1.5
DEFAULT_DIM = 256
DEFAULT_HEADS = 4
DEFAULT_LAYERS = 4
DEFAULT_FFN = 1024
DEFAULT_LATENT = "16,4,16,16"  # C,T,H,W accepted too; see parse_latent
DEFAULT_TEXT_TOKENS = 32
DEFAULT_BATCH = 2
DEFAULT_WARMUP = 2
DEFAULT_REPEATS = 5
DEFAULT_THREADS = 2
LEARNING_RATE = 1e-4
# t is drawn uniformly from [T_MARGIN, 1 - T_MARGIN], inside the open interval (0, 1).
T_MARGIN = 0.01
SEED = 0

# Sampling: the CPU demo's video and solver settings.
SAMPLE_FRAMES = 16
SAMPLE_SIZE = 64
SAMPLE_STEPS = 50
SAMPLE_CFG = 7.5
SAMPLE_SEED = 0
DEFAULT_PROMPT = "a small red circle moving left"
# Untrained fallback: the tiny recipe on the demo's latent, MiniLM-sized text.
FALLBACK_RECIPE = "tiny"
FALLBACK_LATENT = (16, 2, 8, 8)
FALLBACK_TEXT_TOKENS = 12
FALLBACK_TEXT_DIM = 384


def parse_latent(text: str) -> tuple[int, int, int]:
    """``"4,16,16"`` (T,H,W) or ``"16,4,16,16"`` (C,T,H,W, C must be 16) -> ``(T, H, W)``.

    The latent is in latent units; T, H and W must be multiples of the patch ``(1, 2, 2)``.
    """
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--latent must be comma-separated ints T,H,W (or C,T,H,W), got {text!r}"
        ) from error
    if len(sizes) == 4:
        if sizes[0] != LATENT_CHANNELS:
            raise argparse.ArgumentTypeError(
                f"both models take {LATENT_CHANNELS} latent channels, got C={sizes[0]} in {text!r}"
            )
        sizes = sizes[1:]
    if len(sizes) != 3 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"--latent needs 3 positive sizes T,H,W, got {text!r}")
    if any(size % patch for size, patch in zip(sizes, PATCH_SIZE, strict=True)):
        raise argparse.ArgumentTypeError(
            f"--latent {text!r}: T, H, W must be multiples of the patch {PATCH_SIZE}"
        )
    return sizes  # type: ignore[return-value]


def import_wan() -> type[nn.Module]:
    """diffusers' ``WanTransformer3DModel``, with an actionable error when it is missing."""
    try:
        from diffusers import WanTransformer3DModel
    except ImportError as error:
        raise SystemExit(
            "this benchmark compares against diffusers' WanTransformer3DModel: "
            "`pip install -e .[bench]` (or `pip install diffusers`)"
        ) from error
    return WanTransformer3DModel


def ours_config(
    dim: int,
    heads: int,
    layers: int,
    ffn: int,
    latent: tuple[int, int, int],
    *,
    qk_norm: bool = True,
) -> TransformerConfig:
    """Our transformer at the given size, position tables exactly covering ``latent``."""
    frames, height, width = latent
    return TransformerConfig(
        latent_channels=LATENT_CHANNELS,
        dim=dim,
        num_layers=layers,
        num_heads=heads,
        ffn_dim=ffn,
        patch_size=PATCH_SIZE,
        max_latent_frames=frames,
        max_latent_height=height,
        max_latent_width=width,
        qk_norm=qk_norm,
        timestep_embed_dim=FREQ_DIM,
    )


def wan_kwargs(dim: int, heads: int, layers: int, ffn: int, text_dim: int) -> dict:
    """``WanTransformer3DModel`` arguments for the same width, depth and heads as ours.

    ``qk_norm`` and ``cross_attn_norm`` are Wan's defaults, spelled out: Wan's
    attention always has its query/key RMSNorm, and the cross-attention pre-norm
    matches ours. ``rope_max_seq_len`` (1024 positions per axis) is the default too.
    """
    return {
        "patch_size": PATCH_SIZE,
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "text_dim": text_dim,
        "freq_dim": FREQ_DIM,
        "ffn_dim": ffn,
        "num_layers": layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
    }


def wan_train_step_flops(kwargs: dict, num_tokens: int, num_text_tokens: int) -> float:
    """Training-step matmul FLOPs of one Wan sample, counted like ``train_step_flops``.

    Patch embedding, timestep MLP and modulation projection, blocks (q, k, v, o,
    ``Q K^T``, ``P V`` of self- and cross-attention, the two FFN matrices) and the
    output projection, ``2 m n k`` each, times 3 for forward + backward. The text
    projection is left out, as ``train_step_flops`` leaves ours out.
    """
    n, m = num_tokens, num_text_tokens
    d = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
    f = kwargs["ffn_dim"]
    patch_features = math.prod(kwargs["patch_size"]) * kwargs["in_channels"]
    self_attention = 2 * n * d * 4 * d + 2 * 2 * n * n * d
    cross_attention = 2 * n * d * 2 * d + 2 * m * d * 2 * d + 2 * 2 * n * m * d
    feed_forward = 2 * n * d * 2 * f
    blocks = kwargs["num_layers"] * (self_attention + cross_attention + feed_forward)
    embed = 2 * n * patch_features * d + 2 * n * d * patch_features
    timestep = 2 * (kwargs["freq_dim"] * d + d * d + d * NUM_MODULATIONS * d)
    return 3.0 * (blocks + embed + timestep)


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(
    batch: int, latent: tuple[int, int, int], text_tokens: int, text_dim: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """One fixed random batch: latent, target, t in (0, 1), text features and mask."""
    generator = torch.Generator().manual_seed(SEED)
    shape = (batch, LATENT_CHANNELS, *latent)
    t = T_MARGIN + (1 - 2 * T_MARGIN) * torch.rand(batch, generator=generator)
    tensors = {
        "x": torch.randn(shape, generator=generator),
        "target": torch.randn(shape, generator=generator),
        "t": t,
        "hidden": torch.randn(batch, text_tokens, text_dim, generator=generator),
        "mask": torch.ones(batch, text_tokens, dtype=torch.bool),
    }
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def train_step_fn(
    model: nn.Module, forward: Callable[[], torch.Tensor], target: torch.Tensor
) -> Callable[[], None]:
    """One training step of ``model``: forward, MSE to ``target``, backward, AdamW, zero_grad."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    model.train()

    def step() -> None:
        loss = F.mse_loss(forward(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build_ours(config: TransformerConfig, text_dim: int) -> TextToVideoModel:
    torch.manual_seed(SEED)
    model = TextToVideoModel(config, {TEXT_NAME: text_dim})
    model.init_weights()  # as the trainer does
    return model


def build_wan(kwargs: dict) -> nn.Module:
    wan_class = import_wan()
    torch.manual_seed(SEED)
    return wan_class(**kwargs)


def time_round_robin(
    steps: list[Callable[[], None]],
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
) -> tuple[list[list[float]], list[float]]:
    """Seconds of every timed call of each step, and the matmul FLOP/s of every round.

    Each step gets ``warmup`` untimed calls; then each round times every step once
    (the order alternates between rounds, so neither is always first after the
    matmul probe) and measures the machine's fp32 matmul FLOP/s once.
    """
    for step in steps:
        for _ in range(warmup):
            step()
    synchronize(device)
    seconds: list[list[float]] = [[] for _ in steps]
    peaks = []
    for round_index in range(repeats):
        order = list(range(len(steps)))
        if round_index % 2:
            order.reverse()
        for index in order:
            synchronize(device)
            start = time.perf_counter()
            steps[index]()
            synchronize(device)
            seconds[index].append(time.perf_counter() - start)
        peaks.append(measure_matmul_flops(device=device))
    return seconds, peaks


def run_training(args: argparse.Namespace, device: torch.device) -> dict:
    """Build ours and every Wan variant, time their training steps; rows + matmul peak."""
    config = ours_config(
        args.dim, args.heads, args.layers, args.ffn, args.latent, qk_norm=args.qk_norm
    )
    tokens = num_video_tokens(config, args.latent)
    data = make_batch(args.batch, args.latent, args.text_tokens, args.text_dim, device)

    ours = build_ours(config, args.text_dim).to(device)
    text = {TEXT_NAME: (data["hidden"], data["mask"])}
    variants = [
        {
            "model": "ours",
            "ffn": args.ffn,
            "constructor": repr(config),
            "params": count_parameters(ours),
            "flops_per_step": train_step_flops(config, tokens, args.text_tokens) * args.batch,
            "step": train_step_fn(ours, lambda: ours(data["x"], data["t"], text), data["target"]),
        }
    ]
    for wan_ffn in args.wan_ffn:
        kwargs = wan_kwargs(args.dim, args.heads, args.layers, wan_ffn, args.text_dim)
        wan = build_wan(kwargs).to(device)

        def forward(wan: nn.Module = wan) -> torch.Tensor:
            return wan(
                hidden_states=data["x"],
                timestep=data["t"] * WAN_TIMESTEP_SCALE,
                encoder_hidden_states=data["hidden"],
                return_dict=False,
            )[0]

        if wan_ffn == args.ffn:
            note = "same FFN width"
        elif wan_ffn == round(SWIGLU_TO_GELU * args.ffn):
            note = f"FFN {SWIGLU_TO_GELU:g}x, ~our params"
        else:
            note = f"FFN {wan_ffn / args.ffn:.3g}x"
        variants.append(
            {
                "model": f"wan2.1 ({note})",
                "ffn": wan_ffn,
                "constructor": f"WanTransformer3DModel(**{kwargs})",
                "params": count_parameters(wan),
                "flops_per_step": wan_train_step_flops(kwargs, tokens, args.text_tokens)
                * args.batch,
                "step": train_step_fn(wan, forward, data["target"]),
            }
        )

    seconds, peaks = time_round_robin(
        [variant["step"] for variant in variants],
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
    )
    peak = statistics.median(peaks)
    rows = []
    for variant, runs in zip(variants, seconds, strict=True):
        step_s = statistics.median(runs)
        achieved = variant["flops_per_step"] / step_s
        rows.append(
            {
                "model": variant["model"],
                "ffn": variant["ffn"],
                "constructor": variant["constructor"],
                "params": variant["params"],
                "step_s": step_s,
                "step_runs_s": runs,
                "tokens_per_s": args.batch * tokens / step_s,
                "flops_per_step": variant["flops_per_step"],
                "achieved_flops": achieved,
                "mfu": achieved / peak,
            }
        )
    for row in rows[1:]:
        row["wan_over_ours"] = row["step_s"] / rows[0]["step_s"]
    return {
        "video_tokens": tokens,
        "matmul_flops": peak,
        "matmul_flops_runs": peaks,
        "rows": rows,
    }


def to_device(features: dict, device: torch.device) -> dict:
    return {name: (hidden.to(device), mask.to(device)) for name, (hidden, mask) in features.items()}


def time_checkpoint_sampling(
    checkpoint: str, prompt: str, *, warmup: int, repeats: int, device: torch.device
) -> dict:
    """Median seconds of the stages of one video through the pipeline of ``checkpoint``."""
    pipeline = TextToVideoPipeline.from_checkpoint(checkpoint, device=device)
    options = SamplingOptions(
        num_frames=SAMPLE_FRAMES,
        height=SAMPLE_SIZE,
        width=SAMPLE_SIZE,
        steps=SAMPLE_STEPS,
        cfg_scale=SAMPLE_CFG,
    )
    shape = latent_shape_for(
        pipeline.model.config, options.num_frames, options.height, options.width
    )
    tae_device = next(pipeline.tae.parameters()).device

    def one_video() -> dict:
        # The stages of TextToVideoPipeline.__call__, each timed on its own.
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            text = to_device(pipeline.encode_prompts([prompt], options.fps), device)
            negative = pipeline.conditioner.encode([options.negative_prompt])
            negative = to_device(repeat_text_features(negative, 1), device)
        synchronize(device)
        encoded = time.perf_counter()
        latents = generate_latents(
            pipeline.model,
            text,
            negative,
            latent_shape=shape,
            seeds=[SAMPLE_SEED],
            steps=options.steps,
            cfg_scale=options.cfg_scale,
            schedule=options.schedule,
            solver=options.solver,
        )
        synchronize(device)
        solved = time.perf_counter()
        video = pipeline.tae.decode(
            latents.to(tae_device),
            num_frames=options.num_frames,
            frame_size=(options.height, options.width),
        )
        synchronize(device)
        decoded = time.perf_counter()
        if tuple(video.shape[2:]) != (options.num_frames, options.height, options.width):
            raise RuntimeError(f"decoded video has shape {tuple(video.shape)}")
        return {
            "encode_s": encoded - start,
            "solve_s": solved - encoded,
            "decode_s": decoded - solved,
            "text_tokens": sum(hidden.shape[1] for hidden, _ in text.values()),
        }

    for _ in range(warmup):
        one_video()
    runs = [one_video() for _ in range(repeats)]
    totals = [run["encode_s"] + run["solve_s"] + run["decode_s"] for run in runs]
    return {
        "mode": "checkpoint",
        "checkpoint": str(checkpoint),
        "prompt": prompt,
        "model_config": repr(pipeline.model.config),
        "params": count_parameters(pipeline.model),
        "dim": pipeline.model.config.dim,
        "layers": pipeline.model.config.num_layers,
        "latent_shape": list(shape),
        "text_tokens": runs[-1]["text_tokens"],
        "encode_s": statistics.median(run["encode_s"] for run in runs),
        "solve_s": statistics.median(run["solve_s"] for run in runs),
        "decode_s": statistics.median(run["decode_s"] for run in runs),
        "total_s": statistics.median(totals),
        "total_runs_s": totals,
    }


def time_untrained_solve(*, warmup: int, repeats: int, device: torch.device) -> dict:
    """Median seconds of the 50-step CFG solve of the untrained ``tiny`` recipe."""
    config = transformer_recipe(FALLBACK_RECIPE)
    model = build_ours(config, FALLBACK_TEXT_DIM).to(device).eval()
    generator = torch.Generator().manual_seed(SEED)

    def features() -> dict:
        hidden = torch.randn(1, FALLBACK_TEXT_TOKENS, FALLBACK_TEXT_DIM, generator=generator)
        mask = torch.ones(1, FALLBACK_TEXT_TOKENS, dtype=torch.bool)
        return to_device({TEXT_NAME: (hidden, mask)}, device)

    text, negative = features(), features()

    def solve() -> float:
        synchronize(device)
        start = time.perf_counter()
        generate_latents(
            model,
            text,
            negative,
            latent_shape=FALLBACK_LATENT,
            seeds=[SAMPLE_SEED],
            steps=SAMPLE_STEPS,
            cfg_scale=SAMPLE_CFG,
        )
        synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        solve()
    runs = [solve() for _ in range(repeats)]
    return {
        "mode": "untrained tiny recipe, solve only",
        "checkpoint": None,
        "model_config": repr(config),
        "params": count_parameters(model),
        "dim": config.dim,
        "layers": config.num_layers,
        "latent_shape": list(FALLBACK_LATENT),
        "text_tokens": FALLBACK_TEXT_TOKENS,
        "encode_s": None,
        "solve_s": statistics.median(runs),
        "decode_s": None,
        "total_s": statistics.median(runs),
        "total_runs_s": runs,
    }


def describe_machine(device: torch.device, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    text = (
        f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs, "
        f"{threads} torch threads, python {platform.python_version()}, torch {torch.__version__}"
    )
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def format_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_report(args: argparse.Namespace, machine: str, training: dict, sampling: dict) -> None:
    frames, height, width = args.latent
    print(f"machine: {machine}; device {args.device}, fp32")
    print(
        f"training step (forward + MSE + backward + AdamW + zero_grad): batch {args.batch}, "
        f"latent {LATENT_CHANNELS}x{frames}x{height}x{width} -> {training['video_tokens']} video "
        f"tokens, {args.text_tokens} text tokens of width {args.text_dim}; dim {args.dim}, "
        f"{args.heads} heads of {args.dim // args.heads}, depth {args.layers}, ours SwiGLU "
        f"FFN {args.ffn}, qk_norm={args.qk_norm}; medians of {args.repeats} interleaved steps "
        f"after {args.warmup} warm-up"
    )
    print(
        "Wan/ours = step-time ratio (above 1: ours is faster). GFLOP/step counts matmuls "
        "only (3x forward, text projection left out); MFU is against the fp32 matmul "
        f"FLOP/s measured in the same run: {training['matmul_flops'] / 1e9:.1f} GFLOP/s"
    )
    print(
        "| model | FFN | params (M) | step s | tokens/s | GFLOP/step | GFLOP/s | MFU | Wan/ours |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in training["rows"]:
        ratio = f"{row['wan_over_ours']:.2f}x" if "wan_over_ours" in row else ""
        print(
            f"| {row['model']} | {row['ffn']} | {row['params'] / 1e6:.3f} | {row['step_s']:.3f} "
            f"| {row['tokens_per_s']:.0f} | {row['flops_per_step'] / 1e9:.2f} "
            f"| {row['achieved_flops'] / 1e9:.1f} | {row['mfu']:.1%} | {ratio} |"
        )
    ours = training["rows"][0]
    print(
        f"ours MFU: {ours['achieved_flops'] / 1e9:.1f} GFLOP/s achieved / "
        f"{training['matmul_flops'] / 1e9:.1f} GFLOP/s fp32 matmul = {ours['mfu']:.1%}"
    )
    print()
    if sampling["checkpoint"] is None:
        print(
            f"sampling: no --t2v-checkpoint given, so the {FALLBACK_RECIPE} recipe is built "
            f"UNTRAINED and only the {SAMPLE_STEPS}-step CFG solve is timed (no text encoder, "
            "no TAE decode)"
        )
    else:
        print(
            f"sampling: {sampling['checkpoint']}, prompt {sampling['prompt']!r}, "
            f"{SAMPLE_FRAMES} frames {SAMPLE_SIZE}x{SAMPLE_SIZE}"
        )
    latent = "x".join(map(str, sampling["latent_shape"]))
    solve_per_step = sampling["solve_s"] / SAMPLE_STEPS
    print(
        f"{SAMPLE_STEPS} Euler steps, CFG {SAMPLE_CFG} (one batch-2 forward per step), latent "
        f"{latent}, {sampling['text_tokens']} text tokens, model dim {sampling['dim']}, depth "
        f"{sampling['layers']}, {sampling['params'] / 1e6:.2f}M params; medians of {args.repeats} videos after {min(args.warmup, 1)} warm-up"
    )
    print("| sampling | encode s | solve s | per step s | decode s | total s |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| {sampling['mode']} | {format_seconds(sampling['encode_s'])} "
        f"| {sampling['solve_s']:.3f} | {solve_per_step:.4f} "
        f"| {format_seconds(sampling['decode_s'])} | {sampling['total_s']:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM, help="model width")
    parser.add_argument("--heads", type=int, default=DEFAULT_HEADS, help="attention heads")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="transformer blocks")
    parser.add_argument("--ffn", type=int, default=DEFAULT_FFN, help="our SwiGLU hidden width")
    parser.add_argument(
        "--wan-ffn",
        type=int,
        nargs="+",
        default=None,
        help="Wan GELU-MLP hidden widths to time (default: --ffn, same width, and 1.5 * --ffn, "
        "about our parameters and FLOPs)",
    )
    parser.add_argument(
        "--latent",
        type=parse_latent,
        default=parse_latent(DEFAULT_LATENT),
        help="latent T,H,W (or C,T,H,W with C=16), in latent units",
    )
    parser.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS)
    parser.add_argument("--text-dim", type=int, default=TEXT_DIM, help="text feature width")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument(
        "--qk-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="our per-head QK RMSNorm (Wan always has its own)",
    )
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed steps")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed (median)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--t2v-checkpoint",
        default=None,
        help="a text-to-video run (e.g. runs/demo/t2v) to time sampling with; without it "
        "the untrained tiny recipe's solve is timed",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for --t2v-checkpoint")
    parser.add_argument("--json", action="store_true", help="print results as JSON too")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    for name in ("dim", "heads", "layers", "ffn", "text_tokens", "text_dim", "batch", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.dim % args.heads:
        parser.error(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    if (args.dim // args.heads) % 2:
        parser.error("the head dim (--dim / --heads) must be even (Wan's RoPE)")
    if args.wan_ffn is None:
        args.wan_ffn = list(dict.fromkeys([args.ffn, round(SWIGLU_TO_GELU * args.ffn)]))
    if min(args.wan_ffn) < 1:
        parser.error("--wan-ffn widths must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    machine = describe_machine(device, args.threads)
    training = run_training(args, device)
    sample_warmup = min(args.warmup, 1)
    if args.t2v_checkpoint is not None:
        sampling = time_checkpoint_sampling(
            args.t2v_checkpoint,
            args.prompt,
            warmup=sample_warmup,
            repeats=args.repeats,
            device=device,
        )
    else:
        sampling = time_untrained_solve(warmup=sample_warmup, repeats=args.repeats, device=device)

    print_report(args, machine, training, sampling)
    if args.json:
        settings = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in vars(args).items()
            if key != "json"
        }
        print(
            json.dumps(
                {
                    "machine": machine,
                    "settings": settings,
                    "training": training,
                    "sampling": sampling,
                }
            )
        )


if __name__ == "__main__":
    main()
