"""Trainable projection of the frozen text features into one cross-attention context.

Movie Gen (MOVIEGEN.md section 3) follows each frozen encoder with its own
``Linear + LayerNorm`` into the model width and concatenates the projected
token sequences, with their masks, along the sequence axis. Unlike the frozen
encoders, the projector is part of the trained model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["TextFeatures", "TextProjector", "check_features"]

# name -> (hidden (B, L, D) float, mask (B, L) bool), as produced by TextConditioner.encode.
TextFeatures = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def check_features(name: str, hidden: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``hidden`` is ``(B, L, D)`` and ``mask`` bool ``(B, L)``."""
    if hidden.ndim != 3:
        raise ValueError(
            f"text features {name!r}: hidden must be (B, L, D), got shape {tuple(hidden.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"text features {name!r}: mask must be bool, got {mask.dtype}")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"text features {name!r}: mask shape {tuple(mask.shape)} does not match "
            f"hidden (B, L) = {tuple(hidden.shape[:2])}"
        )


class _Projection(nn.Module):
    def __init__(self, encoder_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(encoder_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, L, D_enc) -> (B, L, dim)
        return self.norm(self.linear(hidden))


class TextProjector(nn.Module):
    """One ``Linear(encoder_dim, dim) + LayerNorm(dim)`` per encoder, then concatenate.

    Segments are concatenated in sorted name order (``self.names``), so the
    layout does not depend on the order a dict was built or read in.

    A row whose mask is all False (e.g. only quoted-only encoders and a prompt
    without quotes) cannot be attended to; with any encoder that sees the whole
    prompt every row has at least one real token.
    """

    def __init__(self, encoder_dims: Mapping[str, int], dim: int):
        super().__init__()
        if not encoder_dims:
            raise ValueError("TextProjector needs at least one encoder in encoder_dims")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        for name, encoder_dim in encoder_dims.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"encoder name {name!r} must be a non-empty str without '.'")
            if isinstance(encoder_dim, bool) or not isinstance(encoder_dim, int) or encoder_dim < 1:
                raise ValueError(
                    f"encoder {name!r}: width must be a positive int, got {encoder_dim!r}"
                )
        self.names: tuple[str, ...] = tuple(sorted(encoder_dims))
        self.encoder_dims: dict[str, int] = {name: encoder_dims[name] for name in self.names}
        self.dim = dim
        self.projections = nn.ModuleDict(
            {name: _Projection(self.encoder_dims[name], dim) for name in self.names}
        )

    def init_weights(self) -> None:
        """(Re)initialise every projection, e.g. after building on the meta device."""
        for projection in self.projections.values():
            projection.linear.reset_parameters()
            projection.norm.reset_parameters()

    def forward(self, features: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Project and concatenate.

        Args:
            features: ``name -> (hidden (B, L_name, D_name), mask bool (B, L_name))``
                for exactly the encoders given at construction.

        Returns:
            ``context`` ``(B, L_total, dim)`` (zero at padding) and ``mask`` bool
            ``(B, L_total)``, ``L_total = sum(L_name)``, segments in ``self.names`` order.
        """
        missing = sorted(set(self.names) - set(features))
        extra = sorted(set(features) - set(self.names))
        if missing or extra:
            raise ValueError(
                f"text features do not match the projector's encoders {list(self.names)}: "
                f"missing {missing}, unexpected {extra}"
            )
        contexts, masks = [], []
        batch_size = None
        for name in self.names:
            hidden, mask = features[name]
            check_features(name, hidden, mask)
            if hidden.shape[-1] != self.encoder_dims[name]:
                raise ValueError(
                    f"text features {name!r}: width {hidden.shape[-1]}, but the projector "
                    f"expects {self.encoder_dims[name]}; were the features made by another encoder?"
                )
            if batch_size is None:
                batch_size = hidden.shape[0]
            elif hidden.shape[0] != batch_size:
                raise ValueError(
                    f"text features {name!r}: batch size {hidden.shape[0]}, but "
                    f"{self.names[0]!r} has {batch_size}"
                )
            projection = self.projections[name]
            context = projection(hidden.to(projection.linear.weight.dtype))  # (B, L_name, dim)
            # LayerNorm would turn zero padding into its bias; keep padding exactly zero.
            contexts.append(context.masked_fill(~mask[..., None], 0.0))
            masks.append(mask)
        # (B, L_total, dim), (B, L_total)
        return torch.cat(contexts, dim=1), torch.cat(masks, dim=1)
