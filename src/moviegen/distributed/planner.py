"""Per-GPU memory and step time of a training setup, before renting the GPUs: `moviegen plan`.

The model of memory (every number below is a named constant of this module):

- **Sharding.** FSDP2-style full sharding of parameters, gradients and optimizer
  state over the data-parallel ranks ``dp = gpus / cp``; the context-parallel
  (CP) ranks of one sample hold replicas of the same shards, so they divide the
  activations, not these states. (torchtitan instead folds the CP ranks into
  the FSDP mesh and shards over all GPUs: ``shard_across_cp=True``.)
- **Precision.** ``bf16-mixed`` (the GPU default): fp32 sharded master weights,
  bf16 all-gathered parameters for compute, fp32 gradient reduce-scatter and
  sharded gradients, fp32 AdamW moments, bf16 activations. ``fp32``: everything
  fp32 (the CPU reference, on which the planner is validated). An optional EMA
  copy is fp32 and sharded like the weights.
- **Activations** are counted tensor by tensor from what one block's forward
  saves for backward in eager PyTorch (see :func:`activation_memory`): norm
  inputs and outputs, q/k/v, attention outputs, the FFN's input, hidden
  tensors and output, as multiples of ``(N / cp) x D`` and ``(N / cp) x F``
  per sample, plus the text keys and values of cross-attention. Attention is
  flash/memory-efficient SDPA (no ``N x N`` matrix) unless ``attention="math"``,
  which saves the probabilities and builds two more score matrices in flight.
- **Activation checkpointing.** ``none``: every block keeps everything.
  ``full``: every block keeps only its input; one block's activations are
  rebuilt while it is backpropagated. ``selective``: every block keeps the
  outputs of its matmuls and attention kernels (the FLOP-heavy ops, as a
  ``torch.utils.checkpoint`` selective policy over ``mm`` and SDPA would) and
  recomputes norms, modulation, SiLU, gating and residual adds.
- **Transients.** The all-gathered parameters of the blocks FSDP holds
  unsharded (the running one and the prefetched one) and one block's unsharded
  gradients before the reduce-scatter; the full-length K and V a CP rank
  gathers (and their gradients); gradient buffers inside one block's backward;
  the latents, prediction and loss tensors; the AdamW step's temporaries.
- **The peak** is the larger of two phases. Backward: activations shrink as
  gradients grow, block by block, so their sum is largest at one end of
  backward (with ``grad_accum > 1`` the gradients exist all along). Optimizer
  step: all gradients and the optimizer's temporaries, no activations.
- **Not modelled:** tensor/sequence parallelism (the paper also used them),
  pipeline parallelism, ``torch.compile`` fusions (they save less), the frozen
  text encoders and the TAE (give their resident memory as
  ``extra_memory_gib``), NCCL and CUDA context (covered by the reserve).

Step FLOPs come from :func:`moviegen.transformer.train_step_flops` (matmuls incl.
attention, backward = 2 x forward); full checkpointing adds one more forward of
the blocks. The step time assumes the GPUs sustain ``mfu`` of their peak on the
FLOPs they actually execute.

The CPU validation (:func:`validate_on_cpu`, ``moviegen plan --validate``)
trains small configs in fresh processes and compares the measured peak memory
with the plan for one CPU "GPU" in fp32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch

from moviegen.transformer.config import TransformerConfig, transformer_recipe
from moviegen.transformer.flops import layer_flops, train_step_flops
from moviegen.transformer.model import MovieGenTransformer
from moviegen.transformer.summary import DEFAULT_TEXT_TOKENS, format_count

__all__ = [
    "AC_MODES",
    "ATTENTION_KERNELS",
    "PRECISIONS",
    "VALIDATION_CASES",
    "Precision",
    "TrainingPlan",
    "TrainingSetup",
    "ValidationCase",
    "activation_memory",
    "measure_cpu_peak_memory",
    "parameter_counts",
    "plan_training",
    "validate_on_cpu",
]

GIB = 2**30
MIB = 2**20

# --------------------------------------------------------------------------- hardware

# H100 SXM dense (no sparsity) peaks, from NVIDIA's data sheet.
H100_BF16_DENSE_FLOPS = 989e12
H100_TF32_DENSE_FLOPS = 494.5e12
# An 80 GB H100 exposes 79.6 GiB; --gpu-memory is read in GiB like every row of the table.
DEFAULT_GPU_MEMORY_GIB = 80.0
# Assumed fraction of the peak sustained on the FLOPs actually executed. An
# assumption, not a measurement: large FSDP runs on H100 commonly report 35-45%.
DEFAULT_MFU = 0.40
# Kept free of tensors: CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers.
RUNTIME_RESERVE_GIB = 4.0
# Share of the GPU's memory lost to the caching allocator's fragmentation.
ALLOCATOR_FRAGMENTATION = 0.05

# --------------------------------------------------------------------------- states

# AdamW keeps two moments (exp_avg, exp_avg_sq) per parameter.
ADAMW_MOMENTS = 2
# torch's default multi-tensor (foreach) AdamW on GPU builds one temporary the
# size of the (sharded) parameters: sqrt(exp_avg_sq) before the update. (The
# CPU's per-parameter loop needs only the largest parameter's worth.)
ADAMW_STEP_TEMPORARY_COPIES = 1
# FSDP2 holds the running block unsharded plus the one it prefetches.
FSDP_UNSHARDED_BLOCKS = 2
# Blocks whose unsharded gradients exist at once, waiting for their reduce-scatter.
FSDP_UNSHARDED_GRADIENT_BLOCKS = 1
# Bytes of an fp32 number (EMA shadow, norm statistics, softmax log-sum-exp, the loss path).
FP32_BYTES = 4

# --------------------------------------------------------------------------- activations
# Saved tensors of one block's forward, counted in widths of the model (N x D
# per sample) or of the FFN (N x F), as eager PyTorch saves them for backward
# (checked tensor by tensor with saved_tensors_hooks in tests/test_planner.py).

# Self-attention: block input (RMSNorm), normalised (modulation), modulated
# (q/k/v projections), q, k, v, attention output (= input of the output
# projection: flash SDPA returns it in (B, N, H, hd) layout, so flattening
# heads is a view), output projection (multiplied by the gate).
SELF_ATTENTION_SAVED_WIDTHS = 8
# Cross-attention: residual input (RMSNorm), normalised x weight (q projection),
# q, attention output. The gate-free residual (has_context is not trained)
# keeps no copy of the output projection.
CROSS_ATTENTION_SAVED_WIDTHS = 4
# Without a fused RMSNorm kernel (CPU) the learned weight's multiply also keeps
# the normalised tensor before the weight.
UNFUSED_NORM_EXTRA_WIDTHS = 1
# FFN: residual input, normalised, modulated (w1/w3 input), w2 output (gated).
FFN_SAVED_WIDTHS = 4
# FFN: w1 output (SiLU input), w3 output, SiLU output, their product (w2 input).
FFN_SAVED_HIDDEN = 4
# Cross-attention keys and values over the text (full text length, also under CP).
CROSS_ATTENTION_TEXT_KV = 2
# RMSNorms per block; each keeps one fp32 reciprocal RMS per token.
NORMS_PER_BLOCK = 3
# Attention calls per block; each flash call keeps an fp32 log-sum-exp per head and token.
ATTENTIONS_PER_BLOCK = 2
# Math attention (no fused kernel) also keeps the softmax probabilities (heads
# x queries x keys) and, in flight, the scores and later their gradient.
MATH_ATTENTION_TRANSIENT_SCORES = 2
# Selective checkpointing keeps matmul and attention outputs: self-attention q,
# k, v, attention output and output projection; cross-attention q, attention
# output and output projection; w2's output; plus the block input.
SELECTIVE_SAVED_WIDTHS = 10
# ... and the FFN's w1 and w3 outputs.
SELECTIVE_SAVED_HIDDEN = 2
# Full checkpointing keeps each block's input (context and modulation are shared).
FULL_AC_SAVED_WIDTHS = 1
# Outside the blocks: the final layer's RMSNorm input, normalised and modulated tensors.
FINAL_LAYER_SAVED_WIDTHS = 3
# Text projection: the Linear's output (LayerNorm input) and the context itself.
TEXT_PROJECTION_SAVED_WIDTHS = 2
# Gradient buffers in flight inside one block's backward, beyond its saved
# tensors. Each node frees its saved tensors once it has run, so gradients
# mostly replace what they are computed from; the worst moment is the SwiGLU
# product's backward, which holds its input gradient and makes the SiLU-output
# and w3-output gradients (two more F-wide tensors) before freeing anything...
BACKWARD_WORKSPACE_HIDDEN = 2
# ... next to the residual stream's gradient and one branch's (D-wide each).
BACKWARD_WORKSPACE_WIDTHS = 2
# Latent-sized fp32 tensors of a training step: data, noise, noisy input and
# target (the trainer's x1, x0, xt, target), the prediction, the difference
# saved by the squared error and the squared error itself.
LATENT_COPIES = 7
# A CP rank all-gathers the full-length K and V of self-attention for its
# queries (MOVIEGEN.md section 5) and, in backward, re-gathers them and
# reduce-scatters their gradients: four full-length (N x D) tensors at most.
CP_GATHERED_KV_COPIES = 4

AC_MODES = ("none", "selective", "full")
ATTENTION_KERNELS = ("flash", "math")


@dataclass(frozen=True)
class Precision:
    """Bytes per element of every kind of state, and the matching GPU peak."""

    name: str
    master_bytes: int  # sharded parameters the optimizer updates
    compute_bytes: int  # unsharded (all-gathered) parameters in the matmuls
    gradient_bytes: int  # reduce-scatter dtype = sharded gradients
    moment_bytes: int  # each AdamW moment
    activation_bytes: int  # saved activations
    peak_flops: float  # default peak of one H100 for this precision


PRECISIONS: dict[str, Precision] = {
    # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32).
    "bf16-mixed": Precision("bf16-mixed", 4, 2, 4, 4, 2, H100_BF16_DENSE_FLOPS),
    # Everything fp32 (TF32 matmuls on GPU); the CPU reference.
    "fp32": Precision("fp32", 4, 4, 4, 4, 4, H100_TF32_DENSE_FLOPS),
}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class TrainingSetup:
    """How the transformer is trained: hardware, parallelism, batch and kernels."""

    num_gpus: int = 1  # GPUs in the job
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB  # memory of one GPU
    # Video tokens per sample (after patchifying); None: the most the position tables cover.
    num_video_tokens: int | None = None
    num_text_tokens: int = DEFAULT_TEXT_TOKENS  # cross-attention context length
    micro_batch_size: int = 1  # samples per forward per data-parallel rank
    grad_accum: int = 1  # micro-batches per optimizer step (> 1: gradients live all along)
    context_parallel: int = 1  # GPUs sharing one sample's sequence; divides num_gpus
    # Shard states over all GPUs (FSDP mesh dp x cp, as torchtitan) instead of dp only.
    shard_across_cp: bool = False
    activation_checkpointing: str = "none"  # none | selective | full
    precision: str = "bf16-mixed"  # bf16-mixed | fp32
    attention: str = "flash"  # flash (no N x N matrix) | math (materialises it)
    fused_norm: bool = True  # fused RMSNorm kernel (GPU); False on CPU
    ema: bool = True  # an fp32 EMA copy of the weights (the trainer's default)
    # torch's multi-tensor AdamW (the GPU default); False: the per-parameter loop (CPU).
    foreach_optimizer: bool = True
    text_dims: tuple[int, ...] = ()  # widths of the text encoders whose projections train
    extra_memory_gib: float = 0.0  # resident extras per GPU, e.g. text encoders or the TAE
    peak_flops: float | None = None  # FLOP/s of one GPU; None: the precision's H100 peak
    mfu: float = DEFAULT_MFU  # sustained fraction of peak_flops

    def __post_init__(self) -> None:
        for name in ("num_gpus", "micro_batch_size", "grad_accum", "context_parallel"):
            _positive_int(name, getattr(self, name))
        if self.num_video_tokens is not None:
            _positive_int("num_video_tokens", self.num_video_tokens)
        if isinstance(self.num_text_tokens, bool) or not isinstance(self.num_text_tokens, int):
            raise ValueError(f"num_text_tokens must be an integer, got {self.num_text_tokens!r}")
        if self.num_text_tokens < 0:
            raise ValueError(f"num_text_tokens must be >= 0, got {self.num_text_tokens}")
        if self.num_gpus % self.context_parallel:
            raise ValueError(
                f"the context-parallel degree ({self.context_parallel}) must divide the number "
                f"of GPUs ({self.num_gpus}); data-parallel ranks = gpus / cp"
            )
        if not self.gpu_memory_gib > 0:
            raise ValueError(f"gpu memory must be positive (GiB), got {self.gpu_memory_gib}")
        if not self.extra_memory_gib >= 0:
            raise ValueError(f"extra memory must be >= 0 GiB, got {self.extra_memory_gib}")
        if self.activation_checkpointing not in AC_MODES:
            raise ValueError(
                f"activation checkpointing must be one of {', '.join(AC_MODES)}, "
                f"got {self.activation_checkpointing!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}"
            )
        for width in self.text_dims:
            _positive_int("every text encoder width", width)
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"peak FLOP/s must be positive, got {self.peak_flops}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")

    @property
    def data_parallel(self) -> int:
        """Ranks that train different samples: ``gpus / cp``."""
        return self.num_gpus // self.context_parallel

    @property
    def shard_ranks(self) -> int:
        """Ranks the parameters, gradients and optimizer state are sharded over."""
        return self.num_gpus if self.shard_across_cp else self.data_parallel


# --------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class ParameterCounts:
    """Trainable parameters: one block, all blocks and the rest."""

    per_block: int
    num_blocks: int
    other: int  # embeddings, timestep MLP, final layer, text projections
    largest: int  # the biggest single parameter tensor

    @property
    def total(self) -> int:
        return self.per_block * self.num_blocks + self.other


def parameter_counts(config: TransformerConfig, text_dims: tuple[int, ...] = ()) -> ParameterCounts:
    """Parameters of the transformer (built on ``meta``) and of the text projections
    (``Linear(width, dim)`` with bias + ``LayerNorm(dim)`` per encoder)."""
    with torch.device("meta"):
        model = MovieGenTransformer(config)
    total = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    projections = sum(width * config.dim + 3 * config.dim for width in text_dims)
    other = total - per_block * config.num_layers + projections
    largest = max(
        [p.numel() for p in model.parameters()] + [width * config.dim for width in text_dims]
    )
    return ParameterCounts(per_block, config.num_layers, other, largest)


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes per GPU (one micro-batch) under one checkpointing mode."""

    block_full: float  # everything one block saves without checkpointing
    block_kept: float  # what each block keeps from its forward to its backward
    recompute: float  # rebuilt while one block is backpropagated (block_full - block_kept)
    other: float  # outside the blocks: final layer, positions, text projections
    workspace: float  # gradient buffers and attention scores in flight in one block
    latents: float  # data, noise, prediction and loss tensors (fp32)

    def kept(self, num_blocks: int) -> float:
        """All blocks' kept activations plus those outside the blocks."""
        return num_blocks * self.block_kept + self.other


def activation_memory(
    config: TransformerConfig,
    setup: TrainingSetup,
    num_video_tokens: int,
) -> ActivationMemory:
    """Bytes of activations on one GPU, from the block's shapes.

    With ``b`` samples per micro-batch, ``n = N / cp`` local video tokens,
    ``m`` text tokens, width ``D``, FFN width ``F`` and ``H`` heads, one block
    saves ``b n (8 + 4 [+1] + 4) D + b n 4 F + 2 b m D`` elements in the
    activation dtype, plus ``b n (3 + 2 H)`` fp32 statistics, plus for math
    attention the ``b H n (N + m)`` softmax probabilities.
    """
    precision = PRECISIONS[setup.precision]
    act = precision.activation_bytes
    b, m = setup.micro_batch_size, setup.num_text_tokens
    n = num_video_tokens // setup.context_parallel
    d, f, heads = config.dim, config.ffn_dim, config.num_heads

    widths = SELF_ATTENTION_SAVED_WIDTHS + CROSS_ATTENTION_SAVED_WIDTHS + FFN_SAVED_WIDTHS
    if not setup.fused_norm:
        widths += UNFUSED_NORM_EXTRA_WIDTHS
    statistics = b * n * (NORMS_PER_BLOCK + ATTENTIONS_PER_BLOCK * heads) * FP32_BYTES
    text_kv = CROSS_ATTENTION_TEXT_KV * b * m * d * act
    # Softmax probabilities of math attention: local queries over all keys.
    probabilities = 0.0
    scores_in_flight = 0.0
    if setup.attention == "math":
        probabilities = b * heads * n * (num_video_tokens + m) * act
        scores_in_flight = MATH_ATTENTION_TRANSIENT_SCORES * b * heads * n * num_video_tokens * act
    block_full = (
        b * n * (widths * d + FFN_SAVED_HIDDEN * f) * act + text_kv + statistics + probabilities
    )
    mode = setup.activation_checkpointing
    if mode == "none":
        block_kept = block_full
    elif mode == "selective":
        block_kept = (
            b * n * (SELECTIVE_SAVED_WIDTHS * d + SELECTIVE_SAVED_HIDDEN * f) * act
            + text_kv
            + b * n * ATTENTIONS_PER_BLOCK * heads * FP32_BYTES
            + probabilities
        )
    else:
        block_kept = b * n * FULL_AC_SAVED_WIDTHS * d * act
    # Positions are shared by the micro-batch; text projections are not sequence-sharded.
    other = (
        b * n * FINAL_LAYER_SAVED_WIDTHS * d * act
        + n * d * act
        + (b * m * TEXT_PROJECTION_SAVED_WIDTHS * d * act if setup.text_dims else 0)
    )
    workspace = (
        b * n * (BACKWARD_WORKSPACE_HIDDEN * f + BACKWARD_WORKSPACE_WIDTHS * d) * act
        + scores_in_flight
    )
    patch_features = config.patch_volume * config.latent_channels
    text_features = b * m * max(setup.text_dims, default=0) * FP32_BYTES
    latents = LATENT_COPIES * b * n * patch_features * FP32_BYTES + text_features
    return ActivationMemory(
        block_full=block_full,
        block_kept=block_kept,
        recompute=block_full - block_kept,
        other=other,
        workspace=workspace,
        latents=latents,
    )


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class TrainingPlan:
    """Per-GPU memory (bytes) and throughput of one setup; see :func:`plan_training`."""

    recipe: str
    config: TransformerConfig
    setup: TrainingSetup
    num_video_tokens: int
    parameters: ParameterCounts
    components: dict[str, float]  # name -> bytes per GPU (labelled in format())
    backward_peak: float  # bytes at the worst point of forward/backward
    gradients_at_backward_peak: float  # of which gradients
    step_peak: float  # bytes during the optimizer step
    usable: float  # bytes one GPU offers tensors
    model_flops: float  # per GPU per optimizer step (no recomputation)
    executed_flops: float  # per GPU per optimizer step, with recomputation
    peak_flops: float  # FLOP/s of one GPU
    step_seconds: float
    tokens_per_second: float  # whole job
    tokens_per_step: int  # whole job

    @property
    def peak(self) -> float:
        return max(self.backward_peak, self.step_peak)

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    @property
    def model_mfu(self) -> float:
        """Model FLOPs (without recomputation) per second over the peak."""
        return self.model_flops / self.step_seconds / self.peak_flops

    def to_dict(self) -> dict[str, Any]:
        setup = dataclasses.asdict(self.setup)
        setup["text_dims"] = list(self.setup.text_dims)
        setup["num_video_tokens"] = self.num_video_tokens
        setup["data_parallel"] = self.setup.data_parallel
        setup["shard_ranks"] = self.setup.shard_ranks
        return {
            "recipe": self.recipe,
            "setup": setup,
            "parameters": self.parameters.total,
            "memory_gib": {name: value / GIB for name, value in self.components.items()},
            "backward_peak_gib": self.backward_peak / GIB,
            "gradients_at_backward_peak_gib": self.gradients_at_backward_peak / GIB,
            "step_peak_gib": self.step_peak / GIB,
            "peak_gib": self.peak / GIB,
            "usable_gib": self.usable / GIB,
            "fits": self.fits,
            "model_flops_per_gpu_step": self.model_flops,
            "executed_flops_per_gpu_step": self.executed_flops,
            "peak_flops_per_gpu": self.peak_flops,
            "step_seconds": self.step_seconds,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_second": self.tokens_per_second,
            "tokens_per_second_per_gpu": self.tokens_per_second / self.setup.num_gpus,
            "model_mfu": self.model_mfu,
        }

    def format(self) -> str:
        """A two-column table: components in GiB per GPU, the verdict, throughput."""
        setup, precision = self.setup, PRECISIONS[self.setup.precision]
        dp, shards = setup.data_parallel, setup.shard_ranks
        shard = f"1/{shards}" if shards > 1 else "unsharded"
        labels = {
            "parameters": f"parameters (fp{8 * precision.master_bytes}, {shard})",
            "gradients": f"gradients (fp{8 * precision.gradient_bytes}, {shard})",
            "optimizer": f"AdamW moments (fp{8 * precision.moment_bytes}, {shard})",
            "ema": "EMA weights (fp32)",
            "activations": f"activations kept (AC {setup.activation_checkpointing})",
            "recompute": "recomputed block (AC)",
            "workspace": "backward workspace (one block)",
            "fsdp_buffers": "FSDP unsharded blocks + grads",
            "cp_buffers": "CP gathered K/V",
            "latents": "latents, prediction, loss",
            "optimizer_step": "AdamW step temporaries",
            "extra": "extra (text encoders, TAE)",
        }
        header = (
            f"{self.recipe}: {format_count(self.parameters.total)} parameters, "
            f"{self.num_video_tokens:,} video + {setup.num_text_tokens:,} text tokens x "
            f"{setup.micro_batch_size} per micro-batch"
        )
        layout = (
            f"{setup.num_gpus} GPUs = {dp} data-parallel x {setup.context_parallel} context-"
            f"parallel, {setup.precision}, {setup.attention} attention, "
            f"AC {setup.activation_checkpointing}"
        )
        rows = [(labels[name], f"{value / GIB:10.2f}") for name, value in self.components.items()]
        rows += [
            ("", ""),
            (
                "peak in forward/backward",
                f"{self.backward_peak / GIB:10.2f}  (gradients live: "
                f"{self.gradients_at_backward_peak / GIB:.2f})",
            ),
            ("peak in optimizer step", f"{self.step_peak / GIB:10.2f}"),
            ("peak per GPU", f"{self.peak / GIB:10.2f}"),
            (
                f"usable of {setup.gpu_memory_gib:g} GiB",
                f"{self.usable / GIB:10.2f}  (reserve {RUNTIME_RESERVE_GIB:g} GiB + "
                f"{ALLOCATOR_FRAGMENTATION:.0%} fragmentation)",
            ),
            (
                "fits",
                f"{'yes' if self.fits else 'NO':>10}  (headroom "
                f"{(self.usable - self.peak) / GIB:+.2f} GiB)",
            ),
            ("", ""),
            ("step FLOPs per GPU (model)", f"{self.model_flops:10.3e}"),
            ("step FLOPs per GPU (executed)", f"{self.executed_flops:10.3e}"),
            (
                f"step time at {setup.mfu:.0%} of {self.peak_flops / 1e12:g} TFLOP/s",
                f"{self.step_seconds:10.2f} s",
            ),
            (
                "tokens/s (job | per GPU)",
                f"{self.tokens_per_second:10,.0f} | {self.tokens_per_second / setup.num_gpus:,.0f}",
            ),
            ("model FLOPs utilisation", f"{self.model_mfu:10.1%}"),
        ]
        width = max(len(key) for key, _ in rows)
        lines = [header, layout, f"{'size per GPU':<{width}}  {'GiB':>10}"]
        lines += [f"{key:<{width}}  {value}" if key else "" for key, value in rows]
        return "\n".join(lines)


def _resolve(config: TransformerConfig | str) -> tuple[str, TransformerConfig]:
    if isinstance(config, str):
        return config, transformer_recipe(config)
    if not isinstance(config, TransformerConfig):
        raise TypeError(
            f"config must be a recipe name or a TransformerConfig, got {type(config).__name__}"
        )
    return "custom", config


def plan_training(config: TransformerConfig | str, **setup: Any) -> TrainingPlan:
    """Estimate per-GPU memory and step time of training ``config``.

    Args:
        config: a recipe name (``debug`` ... ``30B``) or a config.
        **setup: fields of :class:`TrainingSetup` (unknown names are an error).

    Returns:
        a :class:`TrainingPlan`; ``print(plan.format())`` or ``plan.to_dict()``.
    """
    recipe, config = _resolve(config)
    setup = TrainingSetup(**setup)
    capacity = math.prod(config.position_table_sizes)
    tokens = setup.num_video_tokens or capacity
    if tokens > capacity:
        raise ValueError(
            f"{tokens:,} video tokens per sample is more than the {recipe} position tables "
            f"cover ({capacity:,} = {' x '.join(map(str, config.position_table_sizes))})"
        )
    if tokens % setup.context_parallel:
        raise ValueError(
            f"{tokens:,} video tokens cannot be split evenly over "
            f"{setup.context_parallel} context-parallel ranks"
        )
    precision = PRECISIONS[setup.precision]
    counts = parameter_counts(config, setup.text_dims)
    dp, shards = setup.data_parallel, setup.shard_ranks
    sharded = counts.total / shards
    block_sharded = counts.per_block / shards
    other_sharded = counts.other / shards

    gradient_block = block_sharded * precision.gradient_bytes
    gradient_other = other_sharded * precision.gradient_bytes
    gradients = sharded * precision.gradient_bytes
    activations = activation_memory(config, setup, tokens)

    # Unsharded copies exist whenever parameters are gathered (several shards) or cast.
    fsdp_buffers = 0.0
    if shards > 1 or precision.compute_bytes != precision.master_bytes:
        cast = (
            precision.gradient_bytes if precision.gradient_bytes != precision.compute_bytes else 0
        )
        fsdp_buffers = (
            FSDP_UNSHARDED_BLOCKS * counts.per_block * precision.compute_bytes
            + counts.other * precision.compute_bytes
            + FSDP_UNSHARDED_GRADIENT_BLOCKS * counts.per_block * (precision.compute_bytes + cast)
        )
    cp_buffers = 0.0
    if setup.context_parallel > 1:
        cp_buffers = (
            CP_GATHERED_KV_COPIES
            * setup.micro_batch_size
            * tokens
            * config.dim
            * precision.activation_bytes
        )

    components = {
        "parameters": sharded * precision.master_bytes,
        "gradients": gradients,
        "optimizer": sharded * ADAMW_MOMENTS * precision.moment_bytes,
        "ema": sharded * FP32_BYTES if setup.ema else 0.0,
        "activations": activations.kept(config.num_layers),
        "recompute": activations.recompute,
        "workspace": activations.workspace,
        "fsdp_buffers": fsdp_buffers,
        "cp_buffers": cp_buffers,
        "latents": activations.latents,
        "optimizer_step": ADAMW_STEP_TEMPORARY_COPIES
        * (sharded if setup.foreach_optimizer else counts.largest)
        * FP32_BYTES,
        "extra": setup.extra_memory_gib * GIB,
    }
    resident = (
        components["parameters"]
        + components["optimizer"]
        + components["ema"]
        + components["extra"]
        + components["latents"]
    )
    in_flight = activations.recompute + activations.workspace + fsdp_buffers + cp_buffers
    all_kept = activations.kept(config.num_layers)
    if setup.grad_accum > 1:
        ends = [(all_kept, gradients)]  # earlier micro-batches' gradients stay
    else:
        # Backward frees a block's activations as it creates its gradients, so
        # their sum is largest at one end: all activations and the first
        # gradients, or all gradients and the first block's activations.
        ends = [
            (all_kept, gradient_other + gradient_block),
            (activations.other + activations.block_kept, gradients),
        ]
    kept, gradients_live = max(ends, key=sum)
    backward_peak = resident + in_flight + kept + gradients_live
    step_peak = resident + gradients + components["optimizer_step"]
    usable = setup.gpu_memory_gib * GIB * (1 - ALLOCATOR_FRAGMENTATION) - RUNTIME_RESERVE_GIB * GIB

    # Throughput: each GPU computes 1/cp of its micro-batch's samples.
    per_sample = train_step_flops(config, tokens, setup.num_text_tokens)
    share = setup.micro_batch_size * setup.grad_accum / setup.context_parallel
    model_flops = per_sample * share
    recompute_flops = 0.0
    if setup.activation_checkpointing == "full":
        recompute_flops = config.num_layers * layer_flops(config, tokens, setup.num_text_tokens)
    executed_flops = model_flops + recompute_flops * share
    peak_flops = setup.peak_flops or precision.peak_flops
    step_seconds = executed_flops / (peak_flops * setup.mfu)
    tokens_per_step = setup.micro_batch_size * setup.grad_accum * dp * tokens
    return TrainingPlan(
        recipe=recipe,
        config=config,
        setup=setup,
        num_video_tokens=tokens,
        parameters=counts,
        components=components,
        backward_peak=backward_peak,
        gradients_at_backward_peak=gradients_live,
        step_peak=step_peak,
        usable=usable,
        model_flops=model_flops,
        executed_flops=executed_flops,
        peak_flops=peak_flops,
        step_seconds=step_seconds,
        tokens_per_second=tokens_per_step / step_seconds,
        tokens_per_step=tokens_per_step,
    )


# --------------------------------------------------------------------------- CPU validation

# Width of the features of a validation case's single text encoder (MiniLM's).
VALIDATION_TEXT_DIM = 384
# Training steps measured per case: the optimizer state exists from the first
# step's update on, so the second step's backward is the first true peak.
VALIDATION_STEPS = 2
# Threads of the measuring process: one, because on a shared two-core machine a
# second OpenMP thread waiting for a busy core makes elementwise ops 100x slower.
VALIDATION_THREADS = 1
# Seconds one measuring process may take before it is abandoned.
VALIDATION_TIMEOUT_S = 600
# Text tokens of every validation case.
VALIDATION_TEXT_TOKENS = 32
# glibc's initial mmap threshold. Pinning it (MALLOC_MMAP_THRESHOLD_) stops
# glibc from raising the threshold after large frees, which otherwise leaves
# freed activations in the heap: resident, but no longer tensors.
MMAP_THRESHOLD_BYTES = 128 * 1024


@dataclass(frozen=True)
class ValidationCase:
    """A small config trained on the CPU to check the planner against reality."""

    name: str
    config: TransformerConfig
    latent_shape: tuple[int, int, int]  # (T, H, W) in latent units
    batch_size: int
    attention: str = "flash"  # "math" forces PyTorch's unfused SDPA
    num_text_tokens: int = VALIDATION_TEXT_TOKENS
    text_dim: int = VALIDATION_TEXT_DIM

    @property
    def num_video_tokens(self) -> int:
        return math.prod(
            size // patch
            for size, patch in zip(self.latent_shape, self.config.patch_size, strict=True)
        )

    def plan(self) -> TrainingPlan:
        """The planner's view: one device, fp32, no checkpointing, no EMA, CPU kernels."""
        return plan_training(
            self.config,
            num_gpus=1,
            num_video_tokens=self.num_video_tokens,
            num_text_tokens=self.num_text_tokens,
            micro_batch_size=self.batch_size,
            precision="fp32",
            attention=self.attention,
            fused_norm=False,
            foreach_optimizer=False,
            ema=False,
            text_dims=(self.text_dim,),
        )


def _case_config(
    *, dim: int, num_layers: int, num_heads: int, ffn_dim: int, latent_shape: tuple[int, int, int]
) -> TransformerConfig:
    """A config whose position tables just cover ``latent_shape``."""
    frames, height, width = latent_shape
    return TransformerConfig(
        dim=dim,
        num_layers=num_layers,
        num_heads=num_heads,
        ffn_dim=ffn_dim,
        max_latent_frames=frames,
        max_latent_height=height,
        max_latent_width=width,
    )


VALIDATION_CASES: tuple[ValidationCase, ...] = (
    # Weights and optimizer state dominate: 14M parameters, 256 tokens.
    ValidationCase(
        name="states",
        config=_case_config(
            dim=384, num_layers=6, num_heads=3, ffn_dim=1024, latent_shape=(4, 16, 16)
        ),
        latent_shape=(4, 16, 16),
        batch_size=1,
    ),
    # Activations dominate: 1M parameters, 8 x 512 tokens.
    ValidationCase(
        name="activations",
        config=_case_config(
            dim=128, num_layers=4, num_heads=2, ffn_dim=352, latent_shape=(8, 16, 16)
        ),
        latent_shape=(8, 16, 16),
        batch_size=8,
    ),
    # Unfused (math) attention: the N x N probabilities dominate.
    ValidationCase(
        name="math-attention",
        config=_case_config(
            dim=64, num_layers=4, num_heads=4, ffn_dim=176, latent_shape=(4, 32, 32)
        ),
        latent_shape=(4, 32, 32),
        batch_size=2,
        attention="math",
    ),
)


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss_bytes()


def _reset_peak_rss() -> None:
    """Restart the peak-RSS watermark (Linux: writing 5 to clear_refs resets
    VmHWM), so that transient peaks of imports and warm-up are not counted."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # elsewhere the lifetime peak is used


def _peak_rss_bytes() -> int:
    import resource

    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def _train_steps(case: dict[str, Any], steps: int) -> None:
    """Forward + MSE loss + backward + clipping + AdamW steps, as the T2V trainer does."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from moviegen.transformer.conditioned import TextToVideoModel

    config = TransformerConfig(
        **{**case["config"], "patch_size": tuple(case["config"]["patch_size"])}
    )
    batch, (frames, height, width) = case["batch_size"], case["latent_shape"]
    generator = torch.Generator().manual_seed(0)
    shape = (batch, config.latent_channels, frames, height, width)
    data = torch.randn(shape, generator=generator)  # x1
    noise = torch.randn(shape, generator=generator)  # x0
    t = torch.rand(batch, generator=generator)
    noisy = t[:, None, None, None, None] * data + (1 - t[:, None, None, None, None]) * noise
    target = data - noise
    hidden = torch.randn(batch, case["num_text_tokens"], case["text_dim"], generator=generator)
    text = {"text": (hidden, torch.ones(hidden.shape[:2], dtype=torch.bool))}

    model = TextToVideoModel(config, {"text": case["text_dim"]})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        kernel = sdpa_kernel(SDPBackend.MATH) if case["attention"] == "math" else nullcontext()
        with kernel:
            prediction = model(noisy, t, text)
        loss = (prediction.float() - target).pow(2).flatten(1).mean(1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def _measure_in_this_process() -> None:
    """Child side of :func:`measure_cpu_peak_memory`: JSON case on stdin, JSON on stdout."""
    request = json.loads(sys.stdin.read())
    torch.set_num_threads(request["num_threads"])
    # Warm up thread pools and kernels on a tiny copy so the baseline includes them.
    tiny = {**request["case"], "batch_size": 1, "latent_shape": [1, 2, 2], "num_text_tokens": 1}
    tiny["config"] = {**tiny["config"], "dim": 8, "num_heads": 1, "ffn_dim": 8, "num_layers": 1}
    _train_steps(tiny, steps=2)
    baseline = _rss_bytes()
    _reset_peak_rss()
    _train_steps(request["case"], steps=request["steps"])
    print(json.dumps({"baseline": baseline, "peak": _peak_rss_bytes()}))


def measure_cpu_peak_memory(
    case: ValidationCase,
    *,
    steps: int = VALIDATION_STEPS,
    num_threads: int = VALIDATION_THREADS,
    timeout_s: float = VALIDATION_TIMEOUT_S,
    pin_mmap_threshold: bool = True,
) -> int:
    """Peak memory (bytes) of training ``case`` on the CPU in a fresh process.

    The peak resident set size minus the resident size just before the model
    is built (after a warm-up on a tiny model): parameters, gradients, AdamW
    state, activations and inputs, with the allocator's overheads.

    With ``pin_mmap_threshold`` (the default) every tensor above
    ``MMAP_THRESHOLD_BYTES`` is its own mapping, returned to the system when
    freed, so the resident size follows the live tensors (the planner's
    subject) rather than glibc's retention of freed heap memory.
    """
    payload = json.dumps(
        {
            "case": {
                "config": dataclasses.asdict(case.config),
                "latent_shape": list(case.latent_shape),
                "batch_size": case.batch_size,
                "attention": case.attention,
                "num_text_tokens": case.num_text_tokens,
                "text_dim": case.text_dim,
            },
            "steps": steps,
            "num_threads": num_threads,
        }
    )
    code = "from moviegen.distributed.planner import _measure_in_this_process as m; m()"
    env = dict(os.environ)
    if pin_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_BYTES)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        input=payload,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"measuring {case.name!r} failed:\n{result.stderr[-2000:]}")
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    return numbers["peak"] - numbers["baseline"]


@dataclass(frozen=True)
class ValidationResult:
    """A case's planned peak against its measured peaks (bytes)."""

    case: ValidationCase
    estimate: float  # the plan's peak
    measured: float  # peak RSS increase, mmap threshold pinned (follows the live tensors)
    measured_default_malloc: float | None = None  # the same under glibc's defaults

    @property
    def ratio(self) -> float:
        return self.estimate / self.measured

    def to_dict(self) -> dict[str, Any]:
        row = {
            "case": self.case.name,
            "parameters": self.case.plan().parameters.total,
            "video_tokens": self.case.num_video_tokens,
            "batch_size": self.case.batch_size,
            "attention": self.case.attention,
            "estimate_mib": self.estimate / MIB,
            "measured_mib": self.measured / MIB,
            "ratio": self.ratio,
        }
        if self.measured_default_malloc is not None:
            row["measured_default_malloc_mib"] = self.measured_default_malloc / MIB
            row["ratio_default_malloc"] = self.estimate / self.measured_default_malloc
        return row


def validate_on_cpu(
    cases: tuple[ValidationCase, ...] = VALIDATION_CASES,
    *,
    steps: int = VALIDATION_STEPS,
    default_malloc: bool = False,
) -> list[ValidationResult]:
    """Measure every case in its own process (twice with ``default_malloc``:
    also without pinning glibc's mmap threshold) and pair it with the plan's peak."""
    results = []
    for case in cases:
        measured = measure_cpu_peak_memory(case, steps=steps)
        unpinned = None
        if default_malloc:
            unpinned = measure_cpu_peak_memory(case, steps=steps, pin_mmap_threshold=False)
        results.append(ValidationResult(case, case.plan().peak, measured, unpinned))
    return results


def format_validation(results: list[ValidationResult]) -> str:
    """A table of estimate vs measured peak memory per case."""
    with_default = all(result.measured_default_malloc is not None for result in results)
    header = (
        f"{'case':<16}{'params':>9}{'tokens':>8}{'batch':>6}{'attention':>10}"
        f"{'estimate MiB':>14}{'measured MiB':>14}{'ratio':>7}"
    )
    if with_default:
        header += f"{'default malloc MiB':>20}{'ratio':>7}"
    lines = [header]
    for result in results:
        row = result.to_dict()
        line = (
            f"{row['case']:<16}{format_count(row['parameters']):>9}{row['video_tokens']:>8}"
            f"{row['batch_size']:>6}{row['attention']:>10}{row['estimate_mib']:>14.1f}"
            f"{row['measured_mib']:>14.1f}{row['ratio']:>7.2f}"
        )
        if with_default:
            line += (
                f"{row['measured_default_malloc_mib']:>20.1f}{row['ratio_default_malloc']:>7.2f}"
            )
        lines.append(line)
    return "\n".join(lines)
