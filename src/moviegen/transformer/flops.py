"""Matmul FLOPs of the transformer, for throughput and MFU logging.

Counting is ``2 m n k`` per ``(m, k) @ (k, n)`` product: every linear layer,
the patch-embedding convolution, the attention score (``Q K^T``) and value
(``P V``) products, the timestep MLP and the optional pooled-text MLP. Elementwise work (norms, softmax,
SiLU, modulation) is left out, as is any saving from masking: padded tokens
cost as much as real ones.
"""

from __future__ import annotations

from moviegen.transformer.blocks import NUM_MODULATIONS
from moviegen.transformer.config import TransformerConfig

__all__ = ["TRAIN_STEP_FACTOR", "forward_flops", "layer_flops", "train_step_flops"]

# Backward costs about twice the forward (gradients w.r.t. inputs and weights).
TRAIN_STEP_FACTOR = 3


def _check_counts(num_video_tokens: int, num_text_tokens: int) -> None:
    if num_video_tokens <= 0 or num_text_tokens < 0:
        raise ValueError(
            f"need num_video_tokens > 0 and num_text_tokens >= 0, "
            f"got {num_video_tokens} and {num_text_tokens}"
        )


def layer_flops(config: TransformerConfig, num_video_tokens: int, num_text_tokens: int) -> float:
    """Forward FLOPs of one block for one sample of ``N`` video and ``L`` text tokens."""
    _check_counts(num_video_tokens, num_text_tokens)
    n, m, d, f = num_video_tokens, num_text_tokens, config.dim, config.ffn_dim
    self_attention = 2 * n * d * 4 * d + 2 * 2 * n * n * d  # q, k, v, o; QK^T and PV
    cross_attention = 2 * n * d * 2 * d + 2 * m * d * 2 * d + 2 * 2 * n * m * d  # q, o; k, v
    feed_forward = 2 * n * d * 3 * f  # w1, w3, w2
    return float(self_attention + cross_attention + feed_forward)


def forward_flops(config: TransformerConfig, num_video_tokens: int, num_text_tokens: int) -> float:
    """Matmul FLOPs of one forward pass for one sample.

    Args:
        config: the architecture.
        num_video_tokens: ``N``, tokens after patchifying (see
            :func:`~moviegen.transformer.config.num_video_tokens`).
        num_text_tokens: ``L``, length of the text context.
    """
    _check_counts(num_video_tokens, num_text_tokens)
    n, d = num_video_tokens, config.dim
    patch_features = config.patch_volume * config.latent_channels
    embed = 2 * n * patch_features * d  # patch embedding
    head = 2 * n * d * patch_features  # final projection
    timestep = 2 * (config.timestep_embed_dim * d + d * d + d * NUM_MODULATIONS * d)
    if config.pooled_text:
        timestep += 2 * 2 * d * d  # the pooled-text MLP's two layers
    blocks = config.num_layers * layer_flops(config, num_video_tokens, num_text_tokens)
    return float(embed + head + timestep) + blocks


def train_step_flops(
    config: TransformerConfig, num_video_tokens: int, num_text_tokens: int
) -> float:
    """FLOPs of forward + backward for one sample: ``3 * forward_flops``."""
    return TRAIN_STEP_FACTOR * forward_flops(config, num_video_tokens, num_text_tokens)
