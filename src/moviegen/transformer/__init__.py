"""The Movie Gen transformer backbone: config and recipes, model, FLOPs, summary."""

from moviegen.transformer.config import (
    TRANSFORMER_RECIPES,
    TransformerConfig,
    num_video_tokens,
    transformer_recipe,
)
from moviegen.transformer.flops import forward_flops, train_step_flops
from moviegen.transformer.model import MovieGenTransformer
from moviegen.transformer.summary import count_parameters, describe

__all__ = [
    "TRANSFORMER_RECIPES",
    "MovieGenTransformer",
    "TransformerConfig",
    "count_parameters",
    "describe",
    "forward_flops",
    "num_video_tokens",
    "train_step_flops",
    "transformer_recipe",
]
