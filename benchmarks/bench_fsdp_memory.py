"""Per-rank memory of FSDP2 training against one process: parameters, gradients, AdamW state.

The ``TextToVideoModel`` of ``--recipe`` is trained for ``--steps`` AdamW steps
(flow-matching MSE on random latents and text, fp32, CPU) twice, each in fresh
processes:

1. **one process**, plain eager model, the whole global batch;
2. **FSDP2** over ``--world-size`` gloo ranks (``build_parallel_model``: meta
   device, ``fully_shard`` per block and root, seeded init), each rank taking
   its share of the global batch.

Each process reports the bytes of the tensors it holds after the last step:
its parameter shards, gradient shards and AdamW state (``exp_avg``,
``exp_avg_sq``, ``step``), which FSDP2 should cut to ``1 / world size``; and its
peak resident memory above a baseline taken after a warm-up (imports, thread
pools, process group), which also counts activations, FSDP's transiently
gathered blocks and gloo's buffers. The allocator's mmap threshold is pinned
(as in ``moviegen plan --validate``) so the resident size follows live tensors.

Usage::

    python benchmarks/bench_fsdp_memory.py [--recipe tiny] [--world-size 2] [--steps 3] \
        [--batch 2] [--latent 4,8,8] [--text-tokens 16] [--text-dim 384] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from moviegen.distributed import ParallelConfig, build_mesh, build_parallel_model
from moviegen.distributed.planner import (
    MIB,
    MMAP_THRESHOLD_BYTES,
    _peak_rss_bytes,
    _reset_peak_rss,
    _rss_bytes,
)
from moviegen.distributed.spawn import run_spawned
from moviegen.transformer import TRANSFORMER_RECIPES, transformer_recipe
from moviegen.transformer.conditioned import TextToVideoModel

DEFAULT_RECIPE = "tiny"
DEFAULT_WORLD_SIZE = 2
DEFAULT_STEPS = 3
DEFAULT_BATCH = 2  # global batch; each FSDP rank takes batch / world size
DEFAULT_LATENT = "4,8,8"  # T,H,W latent units -> 4 x 4 x 4 = 64 tokens
DEFAULT_TEXT_TOKENS = 16
DEFAULT_TEXT_DIM = 384  # MiniLM-L6, the CPU default encoder
TEXT_NAME = "text"
LEARNING_RATE = 1e-4
SEED = 0
THREADS_PER_PROCESS = 1
# Collectives give up after this, so a dead peer fails the run instead of hanging it.
COLLECTIVE_TIMEOUT_S = 300
# A run (all processes, start-up included) is killed after this: generous for the
# larger --recipe choices on CPU, but a hang still ends.
RUN_TIMEOUT_S = 3600
# Warm-up model: big enough to start thread pools and kernels, small next to the real one.
WARMUP_OVERRIDES = {"dim": 8, "num_heads": 1, "ffn_dim": 8, "num_layers": 1}


def parse_latent(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--latent must be T,H,W ints, got {text!r}") from error
    if len(sizes) != 3 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"--latent needs 3 positive sizes T,H,W, got {text!r}")
    return sizes  # type: ignore[return-value]


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process holds of ``tensor`` (its shard if it is a DTensor)."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(
            local_bytes(value)
            for state in optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        ),
    }


def make_batch(settings: dict, rows: slice) -> dict[str, torch.Tensor]:
    """The global batch (same on every rank), sliced to ``rows``."""
    generator = torch.Generator().manual_seed(SEED)
    channels = settings["config"].latent_channels
    shape = (settings["batch"], channels, *settings["latent"])
    x1, x0 = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    t = torch.rand(settings["batch"], generator=generator)
    hidden = torch.randn(
        settings["batch"], settings["text_tokens"], settings["text_dim"], generator=generator
    )
    expand = t[:, None, None, None, None]
    batch = {
        "xt": expand * x1 + (1 - expand) * x0,
        "t": t,
        "hidden": hidden,
        "mask": torch.ones(hidden.shape[:2], dtype=torch.bool),
        "target": x1 - x0,
    }
    return {name: value[rows] for name, value in batch.items()}


def train(model: nn.Module, batch: dict[str, torch.Tensor], steps: int) -> torch.optim.Optimizer:
    """``steps`` AdamW steps; gradients of the last step are kept (zero_grad comes first)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    text = {TEXT_NAME: (batch["hidden"], batch["mask"])}
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(batch["xt"], batch["t"], text), batch["target"])
        loss.backward()
        optimizer.step()
    return optimizer


def measure(rank: int, settings: dict, world_size: int) -> dict:
    """One process's bytes after training; FSDP2 when ``world_size > 1``."""

    def build(config) -> nn.Module:
        if world_size == 1:
            torch.manual_seed(SEED)
            model = TextToVideoModel(config, {TEXT_NAME: settings["text_dim"]})
            model.init_weights()
            return model
        parallel = ParallelConfig()
        mesh = build_mesh(parallel, world_size, "cpu")
        return build_parallel_model(
            lambda: TextToVideoModel(config, {TEXT_NAME: settings["text_dim"]}),
            mesh,
            parallel,
            "cpu",
            seed=SEED,
        )

    per_rank = settings["batch"] // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    warmup_config = replace(settings["config"], **WARMUP_OVERRIDES)
    train(build(warmup_config), make_batch(settings, rows), steps=2)
    baseline = _rss_bytes()
    _reset_peak_rss()
    model = build(settings["config"])
    optimizer = train(model, make_batch(settings, rows), settings["steps"])
    held = held_bytes(model, optimizer)
    return {**held, "peak_rss": _peak_rss_bytes() - baseline}


def run(settings: dict, world_size: int) -> list[dict]:
    """:func:`measure` in ``world_size`` fresh processes; their results in rank order."""
    return run_spawned(
        measure,
        args=(settings, world_size),
        world_size=world_size,
        timeout_s=RUN_TIMEOUT_S,
        collective_timeout_s=COLLECTIVE_TIMEOUT_S,
        process_group=world_size > 1,
        num_threads=THREADS_PER_PROCESS,
        # Fresh interpreters: memory from scratch, and the malloc setting of main().
        start_method="spawn",
    )


def print_report(args: argparse.Namespace, settings: dict, single: dict, ranks: list[dict]) -> None:
    config = settings["config"]
    num_params = sum(
        p.numel() for p in TextToVideoModel(config, {TEXT_NAME: args.text_dim}).parameters()
    )
    print(
        f"recipe {args.recipe} (dim {config.dim}, {config.num_layers} blocks, "
        f"{num_params / 1e6:.2f}M params incl. text projection), fp32 on CPU, AdamW, "
        f"{args.steps} steps, global batch {args.batch}, latent {args.latent}, "
        f"{args.text_tokens} text tokens of width {args.text_dim}"
    )
    print(
        "states = parameters + gradients + AdamW state held by the process after the last "
        "step; peak RSS = peak resident memory above the post-warm-up baseline"
    )
    print("| setup | params MiB | grads MiB | AdamW MiB | states MiB | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = [("1 process (no FSDP)", single)] + [
        (f"FSDP2 rank {rank} of {args.world_size}", result) for rank, result in enumerate(ranks)
    ]
    for name, result in rows:
        states = result["params"] + result["grads"] + result["optimizer"]
        print(
            f"| {name} | {result['params'] / MIB:.2f} | {result['grads'] / MIB:.2f} "
            f"| {result['optimizer'] / MIB:.2f} | {states / MIB:.2f} "
            f"| {result['peak_rss'] / MIB:.1f} |"
        )
    worst_states = max(r["params"] + r["grads"] + r["optimizer"] for r in ranks)
    single_states = single["params"] + single["grads"] + single["optimizer"]
    worst_rss = max(r["peak_rss"] for r in ranks)
    print(
        f"per-rank / one process (largest rank): states {worst_states / single_states:.3f}x "
        f"(ideal {1 / args.world_size:.3f}x), peak RSS {worst_rss / single['peak_rss']:.3f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=TRANSFORMER_RECIPES)
    parser.add_argument("--world-size", type=int, default=DEFAULT_WORLD_SIZE)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="global batch")
    parser.add_argument("--latent", type=parse_latent, default=parse_latent(DEFAULT_LATENT))
    parser.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS)
    parser.add_argument("--text-dim", type=int, default=DEFAULT_TEXT_DIM)
    parser.add_argument("--json", action="store_true", help="print results as JSON too")
    args = parser.parse_args()
    for name in ("world_size", "steps", "batch", "text_tokens", "text_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.world_size < 2:
        parser.error("--world-size must be at least 2 to compare against one process")
    if args.batch % args.world_size:
        parser.error(f"--batch {args.batch} must be divisible by --world-size {args.world_size}")
    config = transformer_recipe(args.recipe)
    settings = {
        "config": config,
        "batch": args.batch,
        "latent": args.latent,
        "text_tokens": args.text_tokens,
        "text_dim": args.text_dim,
        "steps": args.steps,
    }
    # Inherited by the spawned processes: resident memory follows the live tensors.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_BYTES)
    single = run(settings, world_size=1)[0]
    ranks = run(settings, world_size=args.world_size)
    print_report(args, settings, single, ranks)
    if args.json:
        print(json.dumps({"settings": {**vars(args)}, "single": single, "ranks": ranks}))


if __name__ == "__main__":
    main()
