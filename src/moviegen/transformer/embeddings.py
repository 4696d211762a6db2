"""Inputs of the transformer: patches, factorised positions and the timestep.

Token order is ``(t, h, w)`` everywhere: token ``(t * Hp + h) * Wp + w`` is the
patch at frame ``t``, row ``h`` and column ``w`` of a ``(Tp, Hp, Wp)`` token grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moviegen.transformer.blocks import trunc_normal
from moviegen.transformer.config import TransformerConfig

__all__ = ["PatchEmbed", "PooledTextEmbed", "PositionEmbed", "TimestepEmbed", "timestep_features"]

# Standard deviation of the learnable position tables ("normal" init) and of
# the timestep MLP.
EMBED_INIT_STD = 0.02
# "sincos" position init: the slowest sinusoid's period, in table rows, and the
# amplitude (the tables are added at every block, so they start below the
# unit-scale patch embedding).
POSITION_MAX_PERIOD = 100.0
POSITION_INIT_SCALE = 0.5
# t in [0, 1] is stretched to [0, 1000] before the sinusoids, so their
# frequencies resolve the small steps of a 1000-step grid (as in DDPM/DiT).
TIMESTEP_SCALE = 1000.0
# The slowest sinusoid has this period (in units of the scaled timestep).
TIMESTEP_MAX_PERIOD = 10_000.0


class PatchEmbed(nn.Module):
    """Latent ``(B, C, T, H, W)`` -> tokens ``(B, Tp * Hp * Wp, D)`` in ``(t, h, w)`` order.

    A 3D convolution with kernel = stride = ``patch_size``, i.e. one linear map
    of each non-overlapping patch.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.proj = nn.Conv3d(
            config.latent_channels,
            config.dim,
            kernel_size=config.patch_size,
            stride=config.patch_size,
        )

    def init_weights(self) -> None:
        # Xavier on the weight seen as the (D, C * patch) matrix it is.
        nn.init.xavier_uniform_(self.proj.weight.view(self.proj.weight.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x)  # (B, D, Tp, Hp, Wp)
        return tokens.flatten(2).transpose(1, 2)  # (B, N, D)


class PositionEmbed(nn.Module):
    """Factorised learnable absolute positions: ``E[t, h, w] = T[t] + H[h] + W[w]``.

    The three tables have ``(max_len, D)`` rows in token units (latent size /
    patch size along the axis).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.init_kind = config.position_init
        rows_t, rows_h, rows_w = config.position_table_sizes
        self.frames = nn.Parameter(torch.empty(rows_t, config.dim))
        self.rows = nn.Parameter(torch.empty(rows_h, config.dim))
        self.columns = nn.Parameter(torch.empty(rows_w, config.dim))

    def init_weights(self) -> None:
        """``"normal"``: truncated normal noise. ``"sincos"``: table ``a`` of the
        three (frames, rows, columns) holds sinusoids of the row index in the
        ``a``-th third of the channels and zeros elsewhere, so the sum of the
        three tells every ``(t, h, w)`` apart (summing the same sinusoids in all
        channels would confuse ``(t, h)`` with ``(h, t)``)."""
        tables = (self.frames, self.rows, self.columns)
        if self.init_kind == "normal":
            for table in tables:
                trunc_normal(table, EMBED_INIT_STD)
            return
        dim = self.frames.shape[1]
        bounds = [round(dim * k / len(tables)) for k in range(len(tables) + 1)]
        with torch.no_grad():
            for axis, table in enumerate(tables):
                start, stop = bounds[axis], bounds[axis + 1]
                rows = torch.arange(table.shape[0], dtype=torch.float32)
                full = torch.zeros(table.shape, dtype=torch.float32)
                full[:, start:stop] = POSITION_INIT_SCALE * sinusoids(
                    rows, stop - start, POSITION_MAX_PERIOD
                )
                # One copy of the whole table (a sharded table takes its shard).
                table.copy_(full.to(device=table.device, dtype=table.dtype))

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """Position embedding ``(Tp * Hp * Wp, D)`` of a ``(Tp, Hp, Wp)`` token grid."""
        num_t, num_h, num_w = grid
        summed = (
            self.frames[:num_t, None, None, :]  # (Tp, 1, 1, D)
            + self.rows[None, :num_h, None, :]  # (1, Hp, 1, D)
            + self.columns[None, None, :num_w, :]  # (1, 1, Wp, D)
        )  # (Tp, Hp, Wp, D)
        return summed.flatten(0, 2)  # (N, D), (t, h, w) order


def sinusoids(positions: torch.Tensor, num_features: int, max_period: float) -> torch.Tensor:
    """``(N,)`` positions -> ``(N, num_features)``: cosines then sines at
    geometrically spaced periods from 2 up to ``max_period`` (an odd
    ``num_features`` gets one zero column)."""
    half = num_features // 2
    exponents = torch.arange(half, dtype=torch.float32) / max(half - 1, 1)
    periods = 2.0 * (max_period / 2.0) ** exponents  # (F/2,)
    angles = 2 * math.pi * positions[:, None].float() / periods[None, :]  # (N, F/2)
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(features, (0, num_features - 2 * half))


def timestep_features(t: torch.Tensor, num_features: int) -> torch.Tensor:
    """Sinusoidal features ``(B, num_features)`` of ``t`` ``(B,)`` in ``[0, 1]``, in fp32.

    Half cosines, half sines, at frequencies spaced geometrically from 1 to
    ``1 / TIMESTEP_MAX_PERIOD`` (per unit of ``TIMESTEP_SCALE * t``).
    """
    half = num_features // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
    frequencies = torch.exp(-math.log(TIMESTEP_MAX_PERIOD) * exponents)  # (F/2,)
    angles = (TIMESTEP_SCALE * t.float())[:, None] * frequencies[None]  # (B, F/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, F)


class TimestepEmbed(nn.Module):
    """``t`` ``(B,)`` -> embedding ``(B, D)``: sinusoids -> Linear -> SiLU -> Linear."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_features = config.timestep_embed_dim
        self.fc1 = nn.Linear(config.timestep_embed_dim, config.dim)
        self.fc2 = nn.Linear(config.dim, config.dim)

    def init_weights(self) -> None:
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, std=EMBED_INIT_STD)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Features in fp32 (bf16 cannot resolve 1000 * t), then the MLP's dtype.
        features = timestep_features(t, self.num_features).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(features)))  # (B, D)


class PooledTextEmbed(nn.Module):
    """Text tokens ``(B, L, D)`` + mask ``(B, L)`` -> one vector ``(B, D)`` for adaLN.

    The masked mean of the (already projected) text tokens -> Linear -> SiLU ->
    Linear. The model adds it to the timestep embedding, so the caption reaches
    every block's shift, scale and gate directly, as HunyuanVideo and SD3 feed
    a pooled text embedding; cross-attention still reads the tokens. The last
    layer starts at zero, so switching it on does not change an untrained
    model. A sample without text (a dropped caption) pools to zero and gets
    the MLP's learned vector of "no caption".
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.dim)
        self.fc2 = nn.Linear(config.dim, config.dim)

    def init_weights(self) -> None:
        nn.init.normal_(self.fc1.weight, std=EMBED_INIT_STD)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        # context: (B, L, D), context_mask: (B, L) bool
        weights = context_mask.to(context.dtype)[..., None]  # (B, L, 1)
        count = weights.sum(dim=1).clamp(min=1.0)  # (B, 1): no tokens -> a zero mean
        pooled = (context * weights).sum(dim=1) / count  # (B, D)
        return self.fc2(F.silu(self.fc1(pooled)))  # (B, D)
