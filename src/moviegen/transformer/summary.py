"""Parameter counts and a printable summary of a transformer config."""

from __future__ import annotations

import torch

from moviegen.transformer.config import TransformerConfig, num_video_tokens, transformer_recipe
from moviegen.transformer.flops import forward_flops
from moviegen.transformer.model import MovieGenTransformer

__all__ = ["count_parameters", "describe", "format_count"]

# Text tokens assumed by `describe` when none are given: the three encoders'
# sequences together (UL2 and MetaCLIP at 256, ByT5 at 128 is our choice).
DEFAULT_TEXT_TOKENS = 640


def _resolve(config: TransformerConfig | str) -> TransformerConfig:
    return transformer_recipe(config) if isinstance(config, str) else config


def count_parameters(config: TransformerConfig | str) -> int:
    """Parameters of the transformer (a config or a recipe name), built on ``meta``:
    no memory is allocated and no weights are initialised."""
    with torch.device("meta"):
        model = MovieGenTransformer(_resolve(config))
    return sum(parameter.numel() for parameter in model.parameters())


def format_count(count: float) -> str:
    """``29_261_000_000`` -> ``"29.26B"``; ``4_140_000`` -> ``"4.14M"``."""
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= threshold:
            return f"{count / threshold:.2f}{suffix}"
    return f"{count:.0f}"


def describe(
    config: TransformerConfig | str,
    *,
    name: str | None = None,
    latent_shape: tuple[int, int, int] | None = None,
    num_text_tokens: int = DEFAULT_TEXT_TOKENS,
) -> str:
    """A two-column table of the architecture, its size and its cost.

    Args:
        config: a config or a recipe name.
        name: shown in the first row (default: the recipe name, or "custom").
        latent_shape: ``(T, H, W)`` in latent units for the token and FLOP
            rows; default the largest the position tables allow.
        num_text_tokens: context length for the FLOP rows.
    """
    if name is None:
        name = config if isinstance(config, str) else "custom"
    config = _resolve(config)
    latent_shape = tuple(latent_shape or config.max_latent_sizes)
    tokens = num_video_tokens(config, latent_shape)
    params = count_parameters(config)
    forward = forward_flops(config, tokens, num_text_tokens)
    rows = [
        ("transformer", name),
        ("layers", str(config.num_layers)),
        ("dim", str(config.dim)),
        ("heads", f"{config.num_heads} (head dim {config.head_dim})"),
        ("ffn", f"{config.ffn_dim} (SwiGLU)"),
        ("qk norm", "yes" if config.qk_norm else "no"),
        ("patch", "x".join(map(str, config.patch_size))),
        ("position tables", f"latent (T, H, W) <= {config.max_latent_sizes}"),
        ("parameters", f"{params:,} ({format_count(params)})"),
        ("latent (T, H, W)", str(latent_shape)),
        ("video tokens", f"{tokens:,}"),
        ("text tokens", f"{num_text_tokens:,}"),
        ("forward FLOPs/sample", f"{forward:.3e}"),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
