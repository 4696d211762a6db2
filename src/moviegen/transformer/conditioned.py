"""The trainable text-to-video network: text projections + the transformer.

The frozen text encoders stay outside (their features are precomputed for
training); what is trained is every encoder's ``Linear + LayerNorm`` into the
model width (:class:`~moviegen.text.TextProjector`) and the backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from moviegen.text import TextProjector
from moviegen.transformer.config import TransformerConfig
from moviegen.transformer.model import MovieGenTransformer

__all__ = ["TextToVideoModel"]


class TextToVideoModel(nn.Module):
    """``velocity = model(x_t, t, text_features)``.

    Args:
        config: the transformer's config.
        text_dims: ``{encoder name: feature width}`` of the frozen encoders.
    """

    def __init__(self, config: TransformerConfig, text_dims: dict[str, int]):
        super().__init__()
        self.config = config
        self.text_dims = dict(text_dims)
        self.projector = TextProjector(self.text_dims, config.dim)
        self.transformer = MovieGenTransformer(config)

    def init_weights(self) -> None:
        self.transformer.init_weights()
        for module in self.projector.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: dict[str, tuple[torch.Tensor, torch.Tensor]],
        video_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(B, C, T, H, W)`` noisy latents, ``t`` ``(B,)``, ``text``
        ``{name: (hidden (B, L, D), mask (B, L))}`` -> velocity ``(B, C, T, H, W)``."""
        context, context_mask = self.projector(text)  # (B, L_total, dim), (B, L_total)
        return self.transformer(x, t, context, context_mask, video_mask)
