"""The Temporal Autoencoder (TAE): a 2.5D "inflated" image autoencoder.

Video ``(B, 3, T, H, W)`` in ``[-1, 1]`` -> latent ``(B, 16, ceil(T/8), H/8, W/8)``
and back (MOVIEGEN.md section 1):

- every spatial 2D convolution (kernel ``(1, 3, 3)``) is followed by a temporal
  1D convolution (kernel ``(3, 1, 1)``) with symmetric *replicate* padding (not
  causal); temporal convolutions start as the identity, so an untrained model
  begins as a per-frame image autoencoder;
- every spatial attention is followed by a temporal attention;
- three stride-2 temporal convolutions downsample time by 8; the decoder
  upsamples time by nearest-neighbour repetition followed by a convolution,
  with separate weights for the two copies of a frame (see TemporalUpsample).
  ``temporal_compression`` 4, 2 or 1 keeps time at the last stages (as Wan,
  HunyuanVideo and CogVideoX compress time 4x); ``T/8`` below then reads
  ``T/temporal_compression``;
- normalisation is per frame (GroupNorm over ``(C, H, W)`` of one frame) or,
  with ``norm="pixel"``, per pixel (RMS over channels), so no statistic mixes
  frames; optional residual shortcuts (``residual_shortcuts``) wrap every
  down/upsampling and the bottleneck in parameter-free pooling/upsampling paths;
- the encoder sees the video in independent temporal chunks of
  ``encoder_chunk_frames`` (32 by default, the paper's non-overlapping encoder
  tile), so encoding tile by tile equals encoding the whole clip, and training
  sees exactly what long-video inference sees;
- any number of frames ``T >= 1`` works: stride-2 convolutions give
  ``ceil(T / 2)`` frames, and the decoder trims each level to the length the
  encoder had there. Images are one-frame videos.

Spatial sizes that are not multiples of 8 are padded (replicating the last row
and column) before encoding; pass ``frame_size`` to :meth:`TAE.decode` to crop
back. All tensors use the ``channels_last_3d`` memory format internally, which
makes CPU (oneDNN) convolutions several times faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["TAE", "TAE_RECIPES", "TAEConfig", "tae_recipe"]

# Spatial and temporal compression of the TAE (three stride-2 stages each).
COMPRESSION = 8
# Bounds on the posterior log-variance, for numerical safety of exp().
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
GROUPNORM_EPS = 1e-6
# Initial posterior log-variance (std exp(-4) ~ 0.02), see Encoder.
INITIAL_LOGVAR = -8.0


@dataclass(frozen=True, kw_only=True)
class TAEConfig:
    """Architecture of the TAE."""

    in_channels: int = 3  # RGB
    latent_channels: int = 16  # Movie Gen: 16 (more channels helped)
    widths: tuple[int, ...] = (128, 256, 512, 512)  # channels per resolution level
    num_res_blocks: int = 2  # residual blocks per encoder level (decoder: one more)
    # "group": GroupNorm over (C, H, W) of each frame (the paper's SD-style VAE);
    # "pixel": RMS norm over the channels of each pixel (as in Wan's VAE): no
    # statistic spans pixels, so a crop is normalised exactly as inside its frame.
    norm: Literal["group", "pixel"] = "group"
    norm_groups: int = 32  # GroupNorm groups (per frame); unused by "pixel"
    attention: bool = True  # spatial + temporal self-attention in the mid blocks
    attention_head_dim: int = 64  # channels per attention head
    encoder_chunk_frames: int = 32  # encoder sees independent chunks of this many frames
    # Parameter-free shortcuts around every down/upsampling and around the
    # latent bottleneck (residual autoencoding, as in DC-AE): the layers then
    # learn a residual on top of average pooling / nearest upsampling, which
    # trains several times faster at high compression. Off: the paper's TAE.
    residual_shortcuts: bool = False
    # Frames per latent frame: 8 (the paper), 4, 2 or 1. The encoder's first
    # log2(temporal_compression) levels halve time; the others are spatial only
    # (and the decoder mirrors this). Space is always compressed 8x.
    temporal_compression: int = COMPRESSION

    @property
    def temporal_levels(self) -> int:
        """How many of the 3 stride-2 stages also halve time."""
        return self.temporal_compression.bit_length() - 1

    def __post_init__(self) -> None:
        if len(self.widths) != 4:
            raise ValueError(
                f"widths needs 4 levels (3 stride-2 stages give 8x), got {self.widths}"
            )
        if self.norm not in ("group", "pixel"):
            raise ValueError(f"norm must be 'group' or 'pixel', got {self.norm!r}")
        for width in self.widths:
            if self.norm == "group" and width % self.norm_groups:
                raise ValueError(
                    f"width {width} is not divisible by norm_groups {self.norm_groups}"
                )
        if self.residual_shortcuts and self.widths[-1] % self.latent_channels:
            raise ValueError(
                f"residual_shortcuts need the last width ({self.widths[-1]}) to be a multiple "
                f"of latent_channels ({self.latent_channels})"
            )
        if self.temporal_compression not in (1, 2, 4, 8):
            raise ValueError(
                f"temporal_compression must be 1, 2, 4 or 8, got {self.temporal_compression}"
            )
        if self.encoder_chunk_frames % COMPRESSION:
            raise ValueError(
                f"encoder_chunk_frames must be a multiple of {COMPRESSION}, "
                f"got {self.encoder_chunk_frames}"
            )


TAE_RECIPES: dict[str, TAEConfig] = {
    # Unit tests: a few thousand parameters.
    "debug": TAEConfig(widths=(8, 8, 16, 16), num_res_blocks=1, norm_groups=4),
    # The CPU demo: trains on the shapes data in minutes on 2 cores. Per-pixel
    # norms and residual shortcuts: 28.4 dB against 19.6 dB with GroupNorm and
    # no shortcuts after 600 steps on shapes (docs/BENCHMARKS.md).
    "cpu": TAEConfig(
        widths=(16, 32, 64, 64), num_res_blocks=1, norm="pixel", residual_shortcuts=True
    ),
    # Paper-like (an SD-style image VAE inflated to 2.5D).
    "paper": TAEConfig(widths=(128, 256, 512, 512), num_res_blocks=2, norm_groups=32),
}


def tae_recipe(name: str) -> TAEConfig:
    if name not in TAE_RECIPES:
        raise ValueError(f"unknown TAE recipe {name!r}; choose from {sorted(TAE_RECIPES)}")
    return TAE_RECIPES[name]


# ----------------------------------------------------------------------------- layers


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over ``(C, H, W)`` of each frame: statistics never mix frames."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        batch, frames = x.shape[0], x.shape[2]
        # For channels_last_3d tensors this is a view (no copy): (B*T, C, H, W).
        flat = x.transpose(1, 2).flatten(0, 1)
        out = F.group_norm(flat, self.num_groups, self.weight, self.bias, self.eps)
        return out.unflatten(0, (batch, frames)).transpose(1, 2)


class _PixelRMSNormFunction(torch.autograd.Function):
    """RMS norm over the last dimension of ``(N, C)``, with scale and shift, in a
    few whole-tensor passes each way.

    ``F.rms_norm`` has no fused CPU kernel: autograd records its decomposition
    (square, mean, add, rsqrt, two products), and the backward of each, which
    made the norms 18% of a ``cpu``-recipe TAE step. Here the forward is one
    fused reduction (``vector_norm``) and one ``addcmul``; the backward
    recomputes the normalised input instead of keeping it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        channels = x.shape[-1]
        rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).div_(math.sqrt(channels))
        rstd = rms.square_().add_(eps).rsqrt_()  # (N, 1)
        ctx.save_for_backward(x, rstd, weight)
        return torch.addcmul(bias, x * rstd, weight)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        normed = x * rstd
        grad_weight = (grad * normed).sum(0)
        grad_bias = grad.sum(0)
        grad_normed = grad * weight
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)).
        projection = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = torch.addcmul(grad_normed, normed, projection, value=-1.0).mul_(rstd)
        return grad_x, grad_weight, grad_bias, None


class PixelRMSNorm(nn.Module):
    """RMS norm over the channels of each pixel, with a learned scale and shift."""

    def __init__(self, channels: int, eps: float = GROUPNORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        # Channels last: for channels_last_3d tensors the permutes and the
        # flattening are views.
        pixels = x.permute(0, 2, 3, 4, 1)
        out = _PixelRMSNormFunction.apply(
            pixels.reshape(-1, x.shape[1]), self.weight, self.bias, self.eps
        )
        return out.view(pixels.shape).permute(0, 4, 1, 2, 3)


def make_norm(config: TAEConfig, channels: int) -> nn.Module:
    """The normalisation layer ``config.norm`` names; neither mixes frames."""
    if config.norm == "pixel":
        return PixelRMSNorm(channels)
    return FrameGroupNorm(config.norm_groups, channels, eps=GROUPNORM_EPS)


def temporal_conv(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv`` (kernel ``(3, 1, 1)``) over time with replicate padding, ``(B, C, T, H, W)``.

    Computed as a 2D convolution with kernel ``(3, 1)`` over ``(T, H * W)``:
    the same numbers as ``conv`` on the padded input. On one CPU thread oneDNN
    runs the full-resolution ones 4x faster than as a 3D convolution (the
    ``cpu`` recipe's training step 1.24x); on two threads both ways take the
    same time (benchmarks/bench_tae_temporal_conv.py, docs/BENCHMARKS.md).
    The weights stay those of the ``nn.Conv3d``, so checkpoints do not change.
    """
    height, width = x.shape[-2:]
    padded = F.pad(x, (0, 0, 0, 0, 1, 1), mode="replicate").flatten(3)  # (B, C, T + 2, H W)
    y = F.conv2d(padded, conv.weight.squeeze(-1), conv.bias, stride=(conv.stride[0], 1))
    return y.unflatten(3, (height, width)).contiguous(memory_format=torch.channels_last_3d)


class TemporalConv(nn.Module):
    """Conv over time only, kernel ``(3, 1, 1)``, replicate padding, identity init."""

    def __init__(self, channels_in: int, channels_out: int, *, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv3d(channels_in, channels_out, (3, 1, 1), stride=(stride, 1, 1))
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            if channels_in == channels_out:
                # Identity: the untrained model is a per-frame image model.
                self.conv.weight[:, :, 1, 0, 0] = torch.eye(channels_in)
            else:
                nn.init.kaiming_uniform_(self.conv.weight[:, :, 1], a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        return temporal_conv(x, self.conv)


class TemporalUpsample(nn.Module):
    """Double the frame count: nearest-neighbour copies followed by a temporal
    convolution, with separate weights for the two copies of each frame.

    A shared convolution after plain repetition sees identical neighbourhoods
    for most copies and cannot tell them apart: one latent frame would decode to
    eight identical frames. Giving each output phase its own weights (a
    "sub-pixel" convolution in time) lets copies differ; both start as the
    identity, i.e. as exact nearest-neighbour upsampling.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, 2 * channels, (3, 1, 1))
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            identity = torch.eye(channels)
            self.conv.weight[:channels, :, 1, 0, 0] = identity
            self.conv.weight[channels:, :, 1, 0, 0] = identity

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``(B, C, T, H, W)`` -> ``(B, C, num_frames, H, W)`` with ``num_frames <= 2T``."""
        x = temporal_conv(x, self.conv)  # (B, 2C, T, H, W)
        x = rearrange(x, "b (two c) t h w -> b c (t two) h w", two=2)
        return x[:, :, :num_frames].contiguous(memory_format=torch.channels_last_3d)


def pool_shortcut(x: torch.Tensor, *, temporal: bool = True) -> torch.Tensor:
    """2x2x2 average pooling, ``(B, C, T, H, W)`` -> ``(B, C, ceil(T/2), H/2, W/2)``
    (1x2x2, keeping ``T``, when not ``temporal``).

    An odd frame count repeats the last frame (as the replicate-padded
    stride-2 temporal convolution beside it effectively does).
    """
    if not temporal:
        return F.avg_pool3d(x, kernel_size=(1, 2, 2))
    if x.shape[2] % 2:
        x = torch.cat([x, x[:, :, -1:]], dim=2)
    return F.avg_pool3d(x, kernel_size=2)


def upsample_shortcut(x: torch.Tensor, num_frames: int, *, temporal: bool = True) -> torch.Tensor:
    """Nearest 2x2x2 (or 1x2x2) upsampling, trimmed to ``num_frames`` (inverse of
    :func:`pool_shortcut`)."""
    scale = (2.0, 2.0, 2.0) if temporal else (1.0, 2.0, 2.0)
    return F.interpolate(x, scale_factor=scale, mode="nearest")[:, :, :num_frames]


def channel_average(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Average groups of consecutive channels: ``(B, G * channels, ...)`` -> ``(B, channels, ...)``."""
    return x.unflatten(1, (channels, -1)).mean(dim=2)


class Conv25d(nn.Module):
    """A spatial ``(1, 3, 3)`` convolution followed by a temporal ``(3, 1, 1)`` one."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.spatial = nn.Conv3d(channels_in, channels_out, (1, 3, 3), padding=(0, 1, 1))
        self.temporal = TemporalConv(channels_out, channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(self.spatial(x))


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, config: TAEConfig):
        super().__init__()
        self.norm1 = make_norm(config, channels_in)
        self.conv1 = Conv25d(channels_in, channels_out)
        self.norm2 = make_norm(config, channels_out)
        self.conv2 = Conv25d(channels_out, channels_out)
        self.skip = (
            nn.Conv3d(channels_in, channels_out, 1)
            if channels_in != channels_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention25d(nn.Module):
    """Spatial self-attention within each frame, then temporal self-attention
    across frames at each position, each residual with its own norm."""

    def __init__(self, channels: int, config: TAEConfig):
        super().__init__()
        self.num_heads = max(1, channels // config.attention_head_dim)
        self.spatial_norm = make_norm(config, channels)
        self.spatial_qkv = nn.Linear(channels, 3 * channels)
        self.spatial_out = nn.Linear(channels, channels)
        self.temporal_norm = make_norm(config, channels)
        self.temporal_qkv = nn.Linear(channels, 3 * channels)
        self.temporal_out = nn.Linear(channels, channels)
        # Zero-initialised outputs: each attention starts as the identity.
        for layer in (self.spatial_out, self.temporal_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _attend(self, tokens: torch.Tensor, qkv: nn.Linear, out: nn.Linear) -> torch.Tensor:
        # tokens: (N, L, C) -> (N, L, C)
        q, k, v = rearrange(
            qkv(tokens), "n l (three h d) -> three n h l d", three=3, h=self.num_heads
        )
        attended = F.scaled_dot_product_attention(q, k, v)
        return out(rearrange(attended, "n h l d -> n l (h d)"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        batch, _, frames, height, width = x.shape
        tokens = rearrange(self.spatial_norm(x), "b c t h w -> (b t) (h w) c")
        update = self._attend(tokens, self.spatial_qkv, self.spatial_out)
        x = x + rearrange(update, "(b t) (h w) c -> b c t h w", b=batch, h=height)
        if frames > 1:
            tokens = rearrange(self.temporal_norm(x), "b c t h w -> (b h w) t c")
            update = self._attend(tokens, self.temporal_qkv, self.temporal_out)
            x = x + rearrange(update, "(b h w) t c -> b c t h w", b=batch, h=height, w=width)
        return x.contiguous(memory_format=torch.channels_last_3d)


class MidBlock(nn.Module):
    def __init__(self, channels: int, config: TAEConfig):
        super().__init__()
        self.res1 = ResBlock(channels, channels, config)
        self.attention = Attention25d(channels, config) if config.attention else nn.Identity()
        self.res2 = ResBlock(channels, channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attention(self.res1(x)))


# ----------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    """``(B, 3, T, H, W)`` -> posterior moments ``(B, 2 * latent, ceil(T/8), H/8, W/8)``."""

    def __init__(self, config: TAEConfig):
        super().__init__()
        widths = config.widths
        self.conv_in = Conv25d(config.in_channels, widths[0])
        self.levels = nn.ModuleList()
        channels = widths[0]
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(channels, width, config))
                channels = width
            stage = nn.Module()
            stage.blocks = blocks
            if level < len(widths) - 1:
                stage.spatial_down = nn.Conv3d(
                    width, width, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)
                )
                # Time is halved at the first `temporal_levels` stages only.
                stage.halves_time = level < config.temporal_levels
                stage.temporal_down = TemporalConv(
                    width, width, stride=2 if stage.halves_time else 1
                )
            self.levels.append(stage)
        self.mid = MidBlock(channels, config)
        self.norm_out = make_norm(config, channels)
        self.conv_out = Conv25d(channels, 2 * config.latent_channels)
        self.latent_channels = config.latent_channels
        self.shortcuts = config.residual_shortcuts
        with torch.no_grad():
            # Start with a narrow posterior: with log-variance 0, sampling adds
            # noise of std 1 that drowns the untrained encoder's small means,
            # and the decoder learns to ignore the latents for hundreds of steps.
            self.conv_out.temporal.conv.bias[config.latent_channels :] = INITIAL_LOGVAR

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.levels:
            for block in stage.blocks:
                h = block(h)
            if hasattr(stage, "spatial_down"):
                down = stage.temporal_down(stage.spatial_down(h))
                shortcut = pool_shortcut(h, temporal=stage.halves_time) if self.shortcuts else 0
                h = down + shortcut
        h = self.mid(h)
        moments = self.conv_out(F.silu(self.norm_out(h)))
        if self.shortcuts:
            # The posterior mean is a residual on the features' channel-group averages.
            mean, logvar = moments.chunk(2, dim=1)
            moments = torch.cat([mean + channel_average(h, self.latent_channels), logvar], dim=1)
        return moments


class Decoder(nn.Module):
    """``(B, latent, T', H', W')`` -> video ``(B, 3, T, 8 H', 8 W')``."""

    def __init__(self, config: TAEConfig):
        super().__init__()
        widths = config.widths
        channels = widths[-1]
        self.conv_in = Conv25d(config.latent_channels, channels)
        self.mid = MidBlock(channels, config)
        self.levels = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResBlock(channels, widths[level], config))
                channels = widths[level]
            stage = nn.Module()
            stage.blocks = blocks
            if level > 0:
                stage.spatial_up = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))
                # Mirrors the encoder's stage between `level - 1` and `level`.
                stage.doubles_time = level - 1 < config.temporal_levels
                stage.temporal_up = (
                    TemporalUpsample(channels)
                    if stage.doubles_time
                    else TemporalConv(channels, channels)
                )
            self.levels.append(stage)
        self.norm_out = make_norm(config, channels)
        self.conv_out = Conv25d(channels, config.in_channels)
        self.shortcuts = config.residual_shortcuts
        self.latent_repeats = widths[-1] // config.latent_channels

    def forward(self, z: torch.Tensor, frame_counts: list[int]) -> torch.Tensor:
        """``frame_counts``: frames at each level from the top (pixels) down,
        i.e. ``[T, ceil(T/2), ceil(T/4), ceil(T/8)]`` (:func:`level_frame_counts`);
        upsampled levels are trimmed to them."""
        h = self.conv_in(z)
        if self.shortcuts:
            # Each latent channel feeds the group of features it was averaged from.
            h = h + z.repeat_interleave(self.latent_repeats, dim=1)
        h = self.mid(h)
        for index, stage in enumerate(self.levels):
            for block in stage.blocks:
                h = block(h)
            if hasattr(stage, "spatial_up"):
                target = frame_counts[len(self.levels) - 2 - index]
                up = F.interpolate(h, scale_factor=(1, 2, 2), mode="nearest")
                up = stage.spatial_up(up)
                up = stage.temporal_up(up, target) if stage.doubles_time else stage.temporal_up(up)
                if self.shortcuts:
                    up = up + upsample_shortcut(h, target, temporal=stage.doubles_time)
                h = up
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates against."""
        return self.conv_out.temporal.conv.weight


def level_frame_counts(
    num_frames: int, num_levels: int, temporal_levels: int | None = None
) -> list[int]:
    """Frames at each resolution level: ``[T, ceil(T/2), ceil(T/4), ...]``, halving
    at the first ``temporal_levels`` stages only (default: every stage)."""
    if temporal_levels is None:
        temporal_levels = num_levels - 1
    counts = [num_frames]
    for level in range(num_levels - 1):
        counts.append(math.ceil(counts[-1] / 2) if level < temporal_levels else counts[-1])
    return counts


# ----------------------------------------------------------------------------- the autoencoder


class TAE(nn.Module):
    """The temporal autoencoder with latent statistics and tiled inference.

    Training uses :meth:`encode_moments` / :meth:`decode_latents` on raw
    latents. Inference uses :meth:`encode` / :meth:`decode`, which work on
    *normalised* latents ``(z - mean) / std`` with the per-channel statistics
    stored in this module's buffers (measured by ``moviegen tae stats`` and
    saved with the checkpoint), and tile long videos automatically.
    """

    def __init__(self, config: TAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.register_buffer("latent_mean", torch.zeros(config.latent_channels))
        self.register_buffer("latent_std", torch.ones(config.latent_channels))
        self.register_buffer("has_latent_stats", torch.tensor(False))
        self.to(memory_format=torch.channels_last_3d)

    # --------------------------------------------------------------- checks

    def _check_video(self, video: torch.Tensor) -> None:
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"video must be a tensor, got {type(video).__name__}")
        if video.ndim != 5:
            raise ValueError(f"video must be (B, C, T, H, W), got shape {tuple(video.shape)}")
        if video.shape[1] != self.config.in_channels:
            raise ValueError(
                f"video has {video.shape[1]} channels, the TAE expects {self.config.in_channels} "
                "(channels come second: (B, C, T, H, W))"
            )
        if 0 in video.shape:
            raise ValueError(f"video is empty: shape {tuple(video.shape)}")
        if not video.is_floating_point():
            raise TypeError(f"video must be a float tensor in [-1, 1], got {video.dtype}")
        if not torch.isfinite(video).all():
            raise ValueError("video contains NaN or infinite values")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.config.latent_channels}, T', H', W'), "
                f"got shape {tuple(latents.shape)}"
            )
        if 0 in latents.shape:
            raise ValueError(f"latents are empty: shape {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values")

    # --------------------------------------------------------------- raw paths (training)

    def _pad_spatial(self, video: torch.Tensor) -> torch.Tensor:
        height, width = video.shape[-2:]
        pad_h, pad_w = -height % COMPRESSION, -width % COMPRESSION
        if pad_h or pad_w:
            video = F.pad(video, (0, pad_w, 0, pad_h, 0, 0), mode="replicate")
        return video

    def encode_moments(
        self, video: torch.Tensor, *, chunks_at_once: int | None = None
    ) -> torch.Tensor:
        """Posterior moments ``(B, 2 * latent, ceil(T/8), ceil(H/8), ceil(W/8))``.

        The clip is cut into chunks of ``encoder_chunk_frames``; full chunks are
        encoded as one batch (``chunks_at_once=None``) or a few at a time
        (bounded memory); the result is the same either way.
        """
        self._check_video(video)
        video = self._pad_spatial(video).contiguous(memory_format=torch.channels_last_3d)
        chunk = self.config.encoder_chunk_frames
        batch, frames = video.shape[0], video.shape[2]
        num_full = frames // chunk
        outputs = []
        if num_full:
            full = rearrange(
                video[:, :, : num_full * chunk], "b c (n t) h w -> (n b) c t h w", n=num_full
            )
            step = (chunks_at_once or num_full) * batch
            moments = torch.cat([self.encoder(part) for part in full.split(step)])
            outputs.append(rearrange(moments, "(n b) c t h w -> b c (n t) h w", n=num_full))
        if frames % chunk:
            outputs.append(self.encoder(video[:, :, num_full * chunk :]))
        return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]

    @staticmethod
    def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)`` from encoder moments; logvar is clamped for safety."""
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode_latents(self, latents: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Raw latents ``(B, 16, T', H', W')`` -> video ``(B, 3, T, 8H', 8W')``.

        ``num_frames`` (default ``8 T'``) must satisfy ``ceil(T / 8) == T'``
        (8: the config's ``temporal_compression``).
        """
        self._check_latents(latents)
        latent_frames = latents.shape[2]
        if num_frames is None:
            num_frames = latent_frames * self.config.temporal_compression
        counts = level_frame_counts(
            num_frames, len(self.config.widths), self.config.temporal_levels
        )
        if counts[-1] != latent_frames:
            raise ValueError(
                f"{num_frames} frames need {counts[-1]} latent frames, got {latent_frames}"
            )
        return self.decoder(latents.contiguous(memory_format=torch.channels_last_3d), counts)

    def forward(
        self, video: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: ``(reconstruction, mean, logvar)``; reconstruction has
        the input's shape."""
        mean, logvar = self.split_moments(self.encode_moments(video))
        latents = mean
        if sample:
            noise = torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
            latents = mean + torch.exp(0.5 * logvar) * noise
        reconstruction = self.decode_latents(latents, num_frames=video.shape[2])
        height, width = video.shape[-2:]
        return reconstruction[..., :height, :width], mean, logvar

    # --------------------------------------------------------------- normalised paths (inference)

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-channel latent statistics (shape ``(latent_channels,)``)."""
        shape = (self.config.latent_channels,)
        if tuple(mean.shape) != shape or tuple(std.shape) != shape:
            raise ValueError(f"latent stats must have shape {shape}")
        if not (std > 0).all():
            raise ValueError("latent std must be positive")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
        self.has_latent_stats.fill_(True)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(self.has_latent_stats):
            raise ValueError(
                "this TAE has no latent statistics yet: run `moviegen tae stats` on its "
                "checkpoint (or call set_latent_stats), or use encode_moments/decode_latents"
            )
        shape = (1, -1, 1, 1, 1)
        return self.latent_mean.view(shape).to(like), self.latent_std.view(shape).to(like)

    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, *, sample: bool = False, tile: bool | None = None
    ) -> torch.Tensor:
        """Video ``(B, 3, T, H, W)`` -> normalised latents ``(B, 16, ceil(T/8), ceil(H/8), ceil(W/8))``.

        ``tile`` (default: automatic above the tile length) encodes one
        ``encoder_chunk_frames`` chunk at a time, at flat memory.
        """
        from moviegen.tae.tiling import should_tile

        tile = (
            should_tile(video.shape[2], self.config.encoder_chunk_frames) if tile is None else tile
        )
        moments = self.encode_moments(video, chunks_at_once=1 if tile else None)
        mean, logvar = self.split_moments(moments)
        latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        latent_mean, latent_std = self._stats(latents)
        return (latents - latent_mean) / latent_std

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        *,
        num_frames: int | None = None,
        frame_size: tuple[int, int] | None = None,
        tile: bool | None = None,
        tile_latent_frames: int = 4,
        overlap_latent_frames: int = 2,
        spatial_tile_latents: int | None = None,
    ) -> torch.Tensor:
        """Normalised latents -> video ``(B, 3, T, H, W)``, clamped to ``[-1, 1]``.

        Args:
            latents: ``(B, 16, T', H', W')`` normalised latents.
            num_frames: output frames (default ``8 T'``).
            frame_size: crop to ``(H, W)`` (for inputs that were padded to 8).
            tile: decode in overlapping temporal tiles blended linearly
                (default: automatic when ``T'`` exceeds one tile).
            tile_latent_frames, overlap_latent_frames: tile and overlap in
                latent frames (paper: 4 and 2, i.e. 32 and 16 pixel frames).
            spatial_tile_latents: also tile height/width (for large frames).
        """
        from moviegen.tae.tiling import decode_tiled, should_tile

        self._check_latents(latents)
        latent_mean, latent_std = self._stats(latents)
        raw = latents * latent_std + latent_mean
        if num_frames is None:
            num_frames = raw.shape[2] * self.config.temporal_compression
        tile = should_tile(raw.shape[2], tile_latent_frames) if tile is None else tile
        if tile or spatial_tile_latents is not None:
            video = decode_tiled(
                self.decode_latents,
                raw,
                num_frames=num_frames,
                tile_latent_frames=tile_latent_frames,
                overlap_latent_frames=overlap_latent_frames,
                spatial_tile_latents=spatial_tile_latents,
                temporal_compression=self.config.temporal_compression,
            )
        else:
            video = self.decode_latents(raw, num_frames=num_frames)
        if frame_size is not None:
            video = video[..., : frame_size[0], : frame_size[1]]
        return video.clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, *, tile: bool | None = None) -> torch.Tensor:
        """Encode (posterior mean) and decode as inference does, tiling long clips.

        Returns the reconstruction with the input's shape, clamped to ``[-1, 1]``.
        Normalisation is an invertible affine map, so this needs no latent stats.
        """
        from moviegen.tae.tiling import decode_tiled, should_tile

        frames, height, width = video.shape[2:]
        chunk = self.config.encoder_chunk_frames
        tile = should_tile(frames, chunk) if tile is None else tile
        mean, _ = self.split_moments(self.encode_moments(video, chunks_at_once=1 if tile else None))
        if tile:
            output = decode_tiled(
                self.decode_latents,
                mean,
                num_frames=frames,
                temporal_compression=self.config.temporal_compression,
            )
        else:
            output = self.decode_latents(mean, num_frames=frames)
        return output[..., :height, :width].clamp(-1, 1)
