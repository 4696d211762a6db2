"""Architecture of the Movie Gen transformer and its named recipes.

All recipes use head dim 128 except the CPU-sized ones, an FFN width close to
``8/3 * dim`` (SwiGLU keeps the parameter count of a ``4 * dim`` GELU MLP), and
patch ``(1, 2, 2)``; only ``tiny`` adds pooled text to the modulation
(``pooled_text``). Parameter counts are of the transformer alone (text
encoders, their projections and the TAE are not counted), exactly as
:func:`moviegen.transformer.count_parameters` reports them:

========  ======  =====  =====  ======  ==================  ==============
recipe    layers  dim    heads  ffn     tables (T, H, W)    parameters
========  ======  =====  =====  ======  ==================  ==============
debug     2       32     2      64      (8, 16, 16)         49,760
tiny      6       192    6      512     (8, 16, 16)         3.96M
1B        16      2048   16     5632    (32, 96, 96)        1.12B
5B        32      3072   24     8192    (32, 96, 96)        4.90B
9B        32      4096   32     11264   (32, 96, 96)        8.84B
17B       40      5120   40     13824   (32, 96, 96)        17.07B
30B       48      6144   48     16384   (32, 96, 96)        29.26B
========  ======  =====  =====  ======  ==================  ==============

The position tables are sized in *latent* units (TAE output: 8x smaller than
pixels in time, height and width). ``(32, 96, 96)`` covers 768 px at 256
frames: 256 / 8 = 32 latent frames and 768 / 8 = 96 latent pixels, i.e. after
the ``(1, 2, 2)`` patch 32 x 48 x 48 = 73,728 tokens (MOVIEGEN.md section 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["TRANSFORMER_RECIPES", "TransformerConfig", "num_video_tokens", "transformer_recipe"]


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Architecture of :class:`~moviegen.transformer.MovieGenTransformer`.

    The defaults are the ``debug`` recipe.
    """

    latent_channels: int = 16  # channels of the TAE latent the model denoises
    dim: int = 32  # model width; the text context must already be projected to it
    num_layers: int = 2  # transformer blocks (self-attn -> cross-attn -> FFN)
    num_heads: int = 2  # attention heads (no GQA); head dim = dim / num_heads
    ffn_dim: int = 64  # hidden width of the SwiGLU feed-forward
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) latent positions per token
    # Sizes of the factorised position tables in LATENT units (not pixels, not
    # tokens); each must be a multiple of the patch size along its axis, and
    # inputs up to these sizes are accepted. The tables hold size / patch rows.
    max_latent_frames: int = 8  # latent frames (pixel frames / 8)
    max_latent_height: int = 16  # latent rows (pixel rows / 8)
    max_latent_width: int = 16  # latent columns (pixel columns / 8)
    qk_norm: bool = False  # RMSNorm on queries and keys per head (not in the paper)
    # Initial values of the (learnable) position tables: "sincos" gives each
    # axis sinusoids of its index in its own third of the width, so tokens know
    # where they are from step 0; "normal" is small noise the model must first
    # learn to tell apart (see PositionEmbed.init_weights).
    position_init: Literal["sincos", "normal"] = "sincos"
    # Add an MLP of the mean text token to the timestep embedding, so the
    # caption also conditions every block's adaLN modulation (HunyuanVideo and
    # SD3 do this with a pooled CLIP vector; the paper's model does not).
    pooled_text: bool = False
    norm_eps: float = 1e-6  # epsilon of every RMSNorm
    timestep_embed_dim: int = 256  # width of the sinusoidal timestep features

    def __post_init__(self) -> None:
        for name in (
            "latent_channels",
            "dim",
            "num_layers",
            "num_heads",
            "ffn_dim",
            "max_latent_frames",
            "max_latent_height",
            "max_latent_width",
            "timestep_embed_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads}); "
                f"e.g. num_heads={max(1, self.dim // 128)} gives head dim 128"
            )
        if self.position_init not in ("sincos", "normal"):
            raise ValueError(
                f"position_init must be 'sincos' or 'normal', got {self.position_init!r}"
            )
        if self.timestep_embed_dim % 2:
            raise ValueError(
                f"timestep_embed_dim must be even (half cosines, half sines), "
                f"got {self.timestep_embed_dim}"
            )
        if (
            len(self.patch_size) != 3
            or any(isinstance(p, bool) or not isinstance(p, int) for p in self.patch_size)
            or min(self.patch_size) <= 0
        ):
            raise ValueError(
                f"patch_size must be three positive integers (t, h, w), got {self.patch_size!r}"
            )
        for axis, size, patch in zip(
            ("max_latent_frames", "max_latent_height", "max_latent_width"),
            self.max_latent_sizes,
            self.patch_size,
            strict=True,
        ):
            if size % patch:
                raise ValueError(
                    f"{axis} ({size}) must be a multiple of the patch size along that axis "
                    f"({patch}); try {math.ceil(size / patch) * patch}"
                )
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        """Latent positions per token, ``pt * ph * pw``."""
        return math.prod(self.patch_size)

    @property
    def max_latent_sizes(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` of the largest latent the tables cover."""
        return (self.max_latent_frames, self.max_latent_height, self.max_latent_width)

    @property
    def position_table_sizes(self) -> tuple[int, int, int]:
        """Rows of the t, h and w position tables (in tokens, i.e. patches)."""
        return tuple(
            size // patch
            for size, patch in zip(self.max_latent_sizes, self.patch_size, strict=True)
        )


def num_video_tokens(config: TransformerConfig, latent_shape: tuple[int, int, int]) -> int:
    """Tokens of one latent of shape ``(T, H, W)`` (latent units) after patchifying."""
    if len(latent_shape) != 3:
        raise ValueError(f"latent_shape must be (T, H, W), got {latent_shape!r}")
    for size, patch in zip(latent_shape, config.patch_size, strict=True):
        if size <= 0 or size % patch:
            raise ValueError(
                f"latent shape {tuple(latent_shape)} is not a positive multiple of the "
                f"patch size {config.patch_size}"
            )
    return math.prod(
        size // patch for size, patch in zip(latent_shape, config.patch_size, strict=True)
    )


# Position tables of the large recipes: 768 px at 256 frames, in latent units.
_PAPER_TABLES = {"max_latent_frames": 32, "max_latent_height": 96, "max_latent_width": 96}
# Position tables of the CPU recipes: up to 64-frame clips at 128 px.
_CPU_TABLES = {"max_latent_frames": 8, "max_latent_height": 16, "max_latent_width": 16}

_RECIPES: dict[str, TransformerConfig] = {
    # Unit tests: ~50K parameters.
    "debug": TransformerConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, **_CPU_TABLES),
    # The CPU demo (64x64 px, 16 frames -> latents (16, 2, 8, 8), 32 tokens).
    # Pooled text in the modulation: 47% against 38% of the 144 shapes captions
    # all correct after the demo's 680 steps (docs/BENCHMARKS.md).
    "tiny": TransformerConfig(
        dim=192, num_layers=6, num_heads=6, ffn_dim=512, pooled_text=True, **_CPU_TABLES
    ),
    "1B": TransformerConfig(dim=2048, num_layers=16, num_heads=16, ffn_dim=5632, **_PAPER_TABLES),
    "5B": TransformerConfig(dim=3072, num_layers=32, num_heads=24, ffn_dim=8192, **_PAPER_TABLES),
    "9B": TransformerConfig(dim=4096, num_layers=32, num_heads=32, ffn_dim=11264, **_PAPER_TABLES),
    "17B": TransformerConfig(dim=5120, num_layers=40, num_heads=40, ffn_dim=13824, **_PAPER_TABLES),
    # The paper's model: 48 layers, dim 6144, FFN 16384, 48 heads (head dim 128).
    "30B": TransformerConfig(dim=6144, num_layers=48, num_heads=48, ffn_dim=16384, **_PAPER_TABLES),
}

TRANSFORMER_RECIPES: tuple[str, ...] = tuple(_RECIPES)


def transformer_recipe(name: str) -> TransformerConfig:
    """The named config; see the table in this module's docstring."""
    if name not in _RECIPES:
        raise ValueError(
            f"unknown transformer recipe {name!r}; choose from {', '.join(TRANSFORMER_RECIPES)}"
        )
    return _RECIPES[name]
