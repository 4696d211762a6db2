"""Training losses of the Temporal Autoencoder (MOVIEGEN.md section 1).

- :func:`l1_reconstruction`, :func:`kl_divergence`: the VAE terms;
- :func:`outlier_penalty_loss`: Movie Gen's OPL against "latent dots";
- :class:`PerceptualLoss`: an LPIPS-style distance on VGG16 features, loaded from
  local files only (nothing is ever downloaded);
- :class:`PatchDiscriminator` with :func:`hinge_d_loss`, :func:`hinge_g_loss` and
  :func:`adaptive_gan_weight`: the adversarial term;
- :class:`TAELossConfig` and :class:`TAELoss`: everything combined for the trainer.

Every loss here is a *mean* (over elements, positions or frames), never a sum, so
weights keep their meaning when the resolution, clip length or batch changes.
Videos are ``(B, C, T, H, W)`` in ``[-1, 1]``; latents are ``(B, C', T', H', W')``.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

__all__ = [
    "PatchDiscriminator",
    "PerceptualLoss",
    "TAELoss",
    "TAELossConfig",
    "VGG16Features",
    "adaptive_gan_weight",
    "frame_deviation_norms",
    "hinge_d_loss",
    "hinge_g_loss",
    "kl_divergence",
    "l1_reconstruction",
    "outlier_penalty_loss",
    "spatial_gradient_loss",
]

# The paper's OPL radius: positions further than 3 "std norms" from the frame mean.
DEFAULT_OPL_R = 3.0


def _as_video(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, C, H, W)`` images become one-frame videos ``(B, C, 1, H, W)``."""
    if tensor.ndim == 4:
        return tensor.unsqueeze(2)
    if tensor.ndim == 5:
        return tensor
    raise ValueError(
        f"{name} must be (B, C, T, H, W) or (B, C, H, W), got shape {tuple(tensor.shape)}"
    )


def _check_same_shape(prediction: torch.Tensor, target: torch.Tensor) -> None:
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target shapes differ: {tuple(prediction.shape)} "
            f"vs {tuple(target.shape)}"
        )


# ---------------------------------------------------------------------------
# VAE terms and the outlier penalty
# ---------------------------------------------------------------------------


def l1_reconstruction(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over every element; any matching shapes. Returns a scalar."""
    _check_same_shape(prediction, target)
    return (prediction - target).abs().mean()


def spatial_gradient_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the horizontal and vertical pixel differences
    (the gradient difference loss of Mathieu et al., 2016). Blurring an edge
    costs little squared error but spreads the edge's step over several pixel
    differences, each of which this term charges. Any ``(..., H, W)`` shapes
    with ``H, W >= 2``; returns a scalar."""
    _check_same_shape(prediction, target)
    if prediction.shape[-1] < 2 or prediction.shape[-2] < 2:
        raise ValueError(f"need at least 2x2 pixels, got shape {tuple(prediction.shape)}")
    error = prediction - target
    d_width = (error[..., :, 1:] - error[..., :, :-1]).abs().mean()
    d_height = (error[..., 1:, :] - error[..., :-1, :]).abs().mean()
    return d_width + d_height


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` as a **mean over latent elements**.

    Per element the divergence is ``0.5 * (mean^2 + exp(logvar) - 1 - logvar)``; this
    returns its mean over batch and all latent dimensions, so a KL weight does not
    depend on the clip length or resolution. The usual image-VAE convention (LDM,
    taming-transformers) sums over latent elements and averages over the batch: its
    weight ``w_sum`` corresponds here to ``w_sum * num_latent_elements_per_sample``
    (and, since those recipes also *sum* the reconstruction loss over pixels, to
    ``w_sum * num_latent_elements / num_pixel_elements`` relative to our mean L1).

    Args:
        mean, logvar: posterior parameters, same shape, e.g. ``(B, 16, T', H', W')``.

    Returns:
        Scalar tensor; 0 exactly for ``mean = 0, logvar = 0``.
    """
    if mean.shape != logvar.shape:
        raise ValueError(
            f"mean and logvar shapes differ: {tuple(mean.shape)} vs {tuple(logvar.shape)}"
        )
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def frame_deviation_norms(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame: how far each latent vector is from the frame's mean vector.

    ``X`` is the ``(C, H, W)`` latent of one frame and ``X_ij`` its C-vector at
    position ``ij``. Mean and std are per channel over the ``H * W`` positions; the
    std is the *population* std (divide by ``H * W``). With that choice
    ``||std(X)||^2`` equals the mean of ``||X_ij - mean(X)||^2`` over positions, so
    the ratio of the two outputs (the OPL z-score) has root-mean-square exactly 1
    in every frame, whatever the latent scale.

    Both are computed with norms whose gradient is 0 (not NaN) at a zero vector,
    so constant frames are safe to backpropagate through. Computed in float32.

    Args:
        latents: ``(B, C, T, H, W)`` or ``(B, C, H, W)``.

    Returns:
        ``deviation_norm (B, T, H, W)``: ``||X_ij - mean(X)||``;
        ``std_norm (B, T)``: ``||std(X)||``.
    """
    x = _as_video(latents, "latents").float()
    num_positions = x.shape[-2] * x.shape[-1]
    deviation = x - x.mean(dim=(-2, -1), keepdim=True)  # (B, C, T, H, W)
    deviation_norm = torch.linalg.vector_norm(deviation, dim=1)  # (B, T, H, W)
    # sqrt(sum_c var_c) = ||all deviations of the frame|| / sqrt(HW); vector_norm
    # keeps the gradient finite where the frame is constant (sqrt would give inf).
    std_norm = torch.linalg.vector_norm(deviation, dim=(1, 3, 4)) / math.sqrt(num_positions)
    return deviation_norm, std_norm  # (B, T, H, W), (B, T)


def outlier_penalty_loss(latents: torch.Tensor, r: float = DEFAULT_OPL_R) -> torch.Tensor:
    """Movie Gen's Outlier Penalty Loss, vectorised.

    Per frame ``X`` (``(C, H, W)``)::

        L(X, r) = 1 / (H W) * sum_ij max(||X_ij - mean(X)|| - r * ||std(X)||, 0)

    averaged over samples and frames. It penalises the few high-norm "latent dots"
    that carry global information and decode to bright spots, and is exactly 0 for
    frames in which no position lies beyond ``r`` std norms (see
    :func:`frame_deviation_norms` for the statistics; population std).

    Args:
        latents: ``(B, C, T, H, W)`` or ``(B, C, H, W)``; in training the posterior
            mean.
        r: radius in std norms; the paper uses 3.

    Returns:
        Scalar float32 tensor.
    """
    if r <= 0:
        raise ValueError(f"OPL radius r must be positive, got {r}")
    deviation_norm, std_norm = frame_deviation_norms(latents)  # (B, T, H, W), (B, T)
    excess = F.relu(deviation_norm - r * std_norm[..., None, None])
    return excess.mean()


# ---------------------------------------------------------------------------
# Perceptual loss (LPIPS-style, VGG16)
# ---------------------------------------------------------------------------

# torchvision's VGG16 "D" configuration; "M" is a 2x2 max-pool.
_VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
# Indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the LPIPS taps.
_VGG16_TAP_INDICES = (3, 8, 15, 22, 29)
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)
_VGG_KERNEL = 3
_POOL = 2
_RGB_CHANNELS = 3
# LPIPS maps [-1, 1] inputs with this shift and scale (ImageNet statistics expressed
# in [-1, 1] units) before VGG.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# Added to feature norms so all-zero feature vectors do not divide by zero.
_FEATURE_NORM_EPS = 1e-10
_SAFETENSORS_SUFFIX = ".safetensors"
# Key names of the LPIPS linear weights: ours (as in PerceptualLoss.state_dict()) and
# those of the official LPIPS file, accepted as well.
_LIN_KEY = "lin.{index}.weight"
_LPIPS_LIN_KEY = "lin{index}.model.1.weight"


class VGG16Features(nn.Module):
    """VGG16's convolutional stack, returning the five LPIPS tap activations.

    Layer layout and parameter names match torchvision's ``vgg16().features``
    (``features.0.weight``, ``features.0.bias``, ... ``features.28.bias``), so a
    torchvision VGG16 state dict loads (its ``classifier.*`` keys are not needed).
    Random (Kaiming) initialisation, for tests; real use loads weights.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = _RGB_CHANNELS
        for spec in _VGG16_LAYOUT:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=_POOL, stride=_POOL))
            else:
                layers.append(nn.Conv2d(in_channels, spec, _VGG_KERNEL, padding=_VGG_KERNEL // 2))
                layers.append(nn.ReLU())  # not in-place: its outputs are returned as taps
                in_channels = spec
        self.features = nn.Sequential(*layers)
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(N, 3, H, W)`` -> five activations ``(N, C_k, H / 2^k, W / 2^k)``, k = 0..4."""
        taps = []
        x = images
        for index, layer in enumerate(self.features[: _VGG16_TAP_INDICES[-1] + 1]):
            x = layer(x)
            if index in _VGG16_TAP_INDICES:
                taps.append(x)
        return taps


def _load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a plain torch state dict (never unpickles objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == _SAFETENSORS_SUFFIX:
        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as error:
            raise ValueError(f"cannot read {path} as safetensors: {error}") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"cannot read {path} as a torch state dict: {error}") from error
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ValueError(f"{path} does not hold a flat mapping of names to tensors")
    return dict(state)


def _check_keys(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], path: os.PathLike
) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} expected weights: {', '.join(missing)}")
    wrong = [
        f"{key} {tuple(found[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if found[key].shape != value.shape
    ]
    if wrong:
        raise ValueError(f"{path} has weights of the wrong shape: {'; '.join(wrong)}")


class PerceptualLoss(nn.Module):
    """LPIPS-style perceptual distance between videos (or images), per frame.

    For each frame: shift/scale the ``[-1, 1]`` input as LPIPS does, take the five
    VGG16 taps, unit-normalise each feature vector along channels, square the
    difference, weight channels with the LPIPS linear layers (1x1 convs, no bias)
    if present or else average over channels, average over positions, and sum over
    the taps. The result is averaged over frames and samples.

    Parameters are frozen and the module stays in eval mode. Build it with
    :meth:`from_file`; the constructor gives random weights (tests only).

    Args:
        use_lin: whether to have the LPIPS per-channel linear weights.
    """

    def __init__(self, *, use_lin: bool = False) -> None:
        super().__init__()
        self.vgg = VGG16Features()
        self.lin = (
            nn.ModuleList(
                nn.Conv2d(channels, 1, kernel_size=1, bias=False) for channels in VGG16_TAP_CHANNELS
            )
            if use_lin
            else None
        )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Always eval: a frozen metric network, whatever the owner's mode."""
        return super().train(False)

    @classmethod
    def from_file(
        cls, vgg_path: str | os.PathLike, lin_path: str | os.PathLike | None = None
    ) -> PerceptualLoss:
        """Load VGG16 (and optionally LPIPS linear) weights from local files.

        Args:
            vgg_path: safetensors or torch state dict with torchvision VGG16 keys
                ``features.N.weight/bias`` (a full VGG16 state dict is fine).
            lin_path: optional LPIPS linear weights, keys ``lin.K.weight`` or the
                official LPIPS ``linK.model.1.weight``, K = 0..4; without it channels
                are averaged uniformly.

        Raises:
            FileNotFoundError: a path does not exist.
            ValueError: unreadable file, missing keys (listed) or wrong shapes.
        """
        vgg_state = _load_state_dict_file(vgg_path)
        lin_state = _load_state_dict_file(lin_path) if lin_path is not None else None
        # Built on the meta device: every parameter is replaced by a loaded tensor, so
        # a random initialisation would be wasted work.
        with torch.device("meta"):
            loss = cls(use_lin=lin_state is not None)
        expected = loss.vgg.state_dict()
        _check_keys(expected, vgg_state, Path(vgg_path))
        loss.vgg.load_state_dict({key: vgg_state[key] for key in expected}, assign=True)
        if lin_state is not None:
            assert loss.lin is not None and lin_path is not None
            for index in range(len(loss.lin)):
                official = _LPIPS_LIN_KEY.format(index=index)
                if official in lin_state:
                    lin_state[_LIN_KEY.format(index=index)] = lin_state[official]
            expected = {
                _LIN_KEY.format(index=index): conv.weight for index, conv in enumerate(loss.lin)
            }
            _check_keys(expected, lin_state, Path(lin_path))
            for index, conv in enumerate(loss.lin):
                conv.weight = nn.Parameter(lin_state[_LIN_KEY.format(index=index)].float())
        loss.float().requires_grad_(False)
        assert not any(parameter.is_meta for parameter in loss.parameters())
        return loss

    def _frames(self, video: torch.Tensor, max_frames: int | None) -> torch.Tensor:
        """``(B, C, T, H, W)`` -> ``(B * T_kept, C, H, W)``, evenly spaced frames kept."""
        num_frames = video.shape[2]
        if max_frames is not None and num_frames > max_frames:
            # Evenly spaced and deterministic, so a validation number is reproducible.
            keep = torch.linspace(0, num_frames - 1, max_frames, device=video.device).round()
            video = video.index_select(2, keep.long())
        batch, channels, frames, height, width = video.shape
        return video.transpose(1, 2).reshape(batch * frames, channels, height, width)

    def forward(
        self, prediction: torch.Tensor, target: torch.Tensor, *, max_frames: int | None = None
    ) -> torch.Tensor:
        """Mean perceptual distance.

        Args:
            prediction, target: ``(B, 3, T, H, W)`` or ``(B, 3, H, W)`` in ``[-1, 1]``;
                H and W of at least 16 (VGG pools four times before the last tap).
            max_frames: if set, only this many evenly spaced frames are compared.

        Returns:
            Scalar: sum over taps of the per-tap distance, mean over frames and samples.
        """
        _check_same_shape(prediction, target)
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        prediction = _as_video(prediction, "prediction")
        target = _as_video(target, "target")
        if prediction.shape[1] != _RGB_CHANNELS:
            raise ValueError(f"expected RGB input, got {prediction.shape[1]} channels")
        images = torch.cat(
            [self._frames(prediction, max_frames), self._frames(target, max_frames)]
        )  # (2N, 3, H, W): one VGG pass for both
        images = images.float()
        shift = images.new_tensor(_LPIPS_SHIFT).view(1, -1, 1, 1)
        scale = images.new_tensor(_LPIPS_SCALE).view(1, -1, 1, 1)
        images = (images - shift) / scale
        distance = images.new_zeros(())
        for index, features in enumerate(self.vgg(images)):
            features = features / (
                torch.linalg.vector_norm(features, dim=1, keepdim=True) + _FEATURE_NORM_EPS
            )
            pred_features, target_features = features.chunk(2)
            squared = (pred_features - target_features).square()  # (N, C_k, h, w)
            per_position = (
                self.lin[index](squared) if self.lin is not None else squared.mean(1, keepdim=True)
            )  # (N, 1, h, w)
            distance = distance + per_position.mean()
        return distance


# ---------------------------------------------------------------------------
# Adversarial term
# ---------------------------------------------------------------------------

_DISC_KERNEL = 4
_DISC_STRIDE = 2
_DISC_PADDING = 1
# Temporal kernel of the discriminator; time is never strided, so one-frame videos
# (images) and short clips work and every frame gets its own patch logits.
_DISC_TIME_KERNEL = 3
_LEAKY_SLOPE = 0.2
_MAX_GROUPS = 32
# Channel growth stops at width * 8, as in the PatchGAN of Isola et al.
_MAX_WIDTH_MULTIPLIER = 8
# DCGAN-style weight init used by PatchGAN implementations.
_DISC_INIT_STD = 0.02
# Added to the GAN gradient norm in the adaptive weight so it never divides by zero.
_ADAPTIVE_WEIGHT_EPS = 1e-4
DEFAULT_MAX_GAN_WEIGHT = 1e4

DiscriminatorKind = Literal["2.5d", "3d"]
_DISC_KINDS = ("2.5d", "3d")


class _DiscConv(nn.Module):
    """One discriminator convolution: a 2D spatial then a 1D temporal conv ("2.5d"),
    or a single 3D conv ("3d"). Spatial kernel 4, padding 1; temporal kernel 3,
    padding 1, stride 1."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int, kind: DiscriminatorKind
    ) -> None:
        super().__init__()
        time_padding = _DISC_TIME_KERNEL // 2
        if kind == "3d":
            self.layers = nn.Sequential(
                nn.Conv3d(
                    in_channels,
                    out_channels,
                    (_DISC_TIME_KERNEL, _DISC_KERNEL, _DISC_KERNEL),
                    stride=(1, stride, stride),
                    padding=(time_padding, _DISC_PADDING, _DISC_PADDING),
                )
            )
        else:
            self.layers = nn.Sequential(
                nn.Conv3d(
                    in_channels,
                    out_channels,
                    (1, _DISC_KERNEL, _DISC_KERNEL),
                    stride=(1, stride, stride),
                    padding=(0, _DISC_PADDING, _DISC_PADDING),
                ),
                nn.Conv3d(
                    out_channels,
                    out_channels,
                    (_DISC_TIME_KERNEL, 1, 1),
                    padding=(time_padding, 0, 0),
                ),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator for videos (Isola et al.), GroupNorm instead of BatchNorm.

    ``num_layers`` stride-2 convolutions (the first without normalisation), one
    stride-1 convolution, and a stride-1 convolution to one logit channel; channels
    grow as ``width * 2^k`` up to ``width * 8``. Every convolution is factorised
    (``kind="2.5d"``: spatial 2D then temporal 1D, like the TAE itself) or full 3D
    (``kind="3d"``). Time is not downsampled.

    Args:
        in_channels: video channels (3 for RGB).
        kind: ``"2.5d"`` or ``"3d"``.
        width: channels of the first layer.
        num_layers: number of stride-2 layers; H and W must be at least
            ``2^(num_layers + 2)`` (the two stride-1 kernel-4 layers each remove one
            pixel).
    """

    def __init__(
        self,
        in_channels: int = _RGB_CHANNELS,
        *,
        kind: DiscriminatorKind = "2.5d",
        width: int = 64,
        num_layers: int = 3,
    ) -> None:
        super().__init__()
        if kind not in _DISC_KINDS:
            raise ValueError(f"discriminator kind must be one of {_DISC_KINDS}, got {kind!r}")
        if width < 1 or num_layers < 1:
            raise ValueError(f"width and num_layers must be >= 1, got {width}, {num_layers}")
        self.kind = kind
        self.num_layers = num_layers

        def norm(channels: int) -> nn.GroupNorm:
            return nn.GroupNorm(math.gcd(channels, _MAX_GROUPS), channels)

        def act() -> nn.LeakyReLU:
            return nn.LeakyReLU(_LEAKY_SLOPE)

        layers: list[nn.Module] = [
            _DiscConv(in_channels, width, stride=_DISC_STRIDE, kind=kind),
            act(),
        ]
        channels = width
        for index in range(1, num_layers + 1):
            # The last iteration is the stride-1 layer before the logits.
            stride = _DISC_STRIDE if index < num_layers else 1
            out_channels = width * min(2**index, _MAX_WIDTH_MULTIPLIER)
            layers += [_DiscConv(channels, out_channels, stride=stride, kind=kind)]
            layers += [norm(out_channels), act()]
            channels = out_channels
        layers.append(_DiscConv(channels, 1, stride=1, kind=kind))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.normal_(module.weight, std=_DISC_INIT_STD)
                nn.init.zeros_(module.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` (or images ``(B, C, H, W)``) -> logits ``(B, 1, T, h, w)``
        with ``h = H / 2^num_layers - 2`` (likewise w)."""
        video = _as_video(video, "video")
        min_size = 2 ** (self.num_layers + 2)
        if min(video.shape[-2:]) < min_size:
            raise ValueError(
                f"frames of {tuple(video.shape[-2:])} are too small for a {self.num_layers}-layer "
                f"discriminator (need at least {min_size} x {min_size})"
            )
        return self.layers(video)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss ``-mean(fake)``."""
    return -fake_logits.mean()


def adaptive_gan_weight(
    reconstruction_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = DEFAULT_MAX_GAN_WEIGHT,
) -> torch.Tensor:
    """VQGAN's adaptive GAN weight (Esser et al., taming-transformers).

    ``||d rec / d w|| / (||d gan / d w|| + eps)`` with ``w`` the decoder's last
    layer weight, clamped to ``[0, max_weight]`` and detached: it scales the GAN
    term so its gradient at the decoder output has the size of the reconstruction
    gradient, whatever the two losses' scales are. Both graphs are retained, so
    the caller can still backpropagate the total.

    Args:
        reconstruction_loss, gan_loss: scalars that depend on ``last_layer_weight``.
        last_layer_weight: the decoder's final weight tensor (a leaf parameter).
        max_weight: upper clamp.

    Returns:
        Detached scalar tensor.
    """
    (rec_grad,) = torch.autograd.grad(reconstruction_loss, last_layer_weight, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)
    weight = torch.linalg.vector_norm(rec_grad) / (
        torch.linalg.vector_norm(gan_grad) + _ADAPTIVE_WEIGHT_EPS
    )
    return weight.clamp(0.0, max_weight).detach()


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients into ``module``'s parameters (not through it)."""
    flags = [parameter.requires_grad for parameter in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(module.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)


# ---------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TAELossConfig:
    """Weights and switches of the TAE objective. All loss terms are means (see
    the module docstring), so weights do not depend on resolution or clip length."""

    # Mean absolute error between reconstruction and input video.
    l1_weight: float = 1.0
    # Mean squared error. The paper uses L1 alone; on sparse content (a small
    # object on black, as in the shapes data) L1's constant-size gradients from
    # the nearly right background drown the object's, and training stalls at
    # an all-black output, while MSE's vanish as the background fits (measured:
    # 15.4 dB with L1 vs 26.4 dB with MSE after 200 steps on 4 shapes clips).
    l2_weight: float = 0.0
    # Spatial gradient difference (spatial_gradient_loss): sharpens edges that
    # the squared error leaves blurred.
    gradient_weight: float = 0.0
    # Per-element mean KL (see kl_divergence); small, as in image VAEs. 1e-6 on a
    # mean is ~100x stronger, relative to L1, than LDM's 1e-6 on sums (our TAE has
    # 96 pixel elements per latent element), which keeps the latent scale bounded
    # without blurring.
    kl_weight: float = 1e-6
    # Outlier penalty. The 1e5 quoted for the paper refers to its unpublished loss
    # normalisation; OPL here is, like L1, a per-position mean and is exactly 0
    # without outliers, so 1.0 costs nothing on healthy latents and is large
    # enough to remove latent dots. Tune it with eval.metrics.latent_outlier_stats.
    opl_weight: float = 1.0
    # OPL radius in std norms (paper: 3).
    opl_r: float = DEFAULT_OPL_R
    # OPL counts from this step on. The paper trains 50K steps without and then
    # fine-tunes 10K with it; short CPU runs keep it on from the start.
    opl_start_step: int = 0
    # LPIPS-style perceptual loss; > 0 requires perceptual_vgg_path.
    perceptual_weight: float = 0.0
    # Local VGG16 weights (torchvision key names), safetensors or torch state dict.
    perceptual_vgg_path: str | None = None
    # Optional local LPIPS linear-layer weights; without them channels are averaged.
    perceptual_lin_path: str | None = None
    # Frames per clip compared by the perceptual loss (evenly spaced), to bound its
    # cost; None compares all.
    perceptual_max_frames: int | None = 4
    # Weight of the generator's GAN term; 0 builds no discriminator at all.
    disc_weight: float = 0.0
    # GAN terms (generator and discriminator) count from this step on; starting
    # after the autoencoder reconstructs reasonably keeps GAN training stable.
    disc_start_step: int = 0
    # "2.5d" (spatial then temporal convs, like the TAE) or "3d".
    disc_kind: DiscriminatorKind = "2.5d"
    # Channels of the discriminator's first layer.
    disc_width: int = 32
    # Stride-2 layers of the discriminator (frames need >= 2^(layers + 2) pixels).
    disc_layers: int = 3
    # Scale the GAN term by adaptive_gan_weight when the trainer passes the
    # decoder's last layer weight; otherwise disc_weight alone.
    adaptive_disc_weight: bool = True

    def __post_init__(self) -> None:
        weights = {
            "l1_weight": self.l1_weight,
            "l2_weight": self.l2_weight,
            "gradient_weight": self.gradient_weight,
            "kl_weight": self.kl_weight,
            "opl_weight": self.opl_weight,
            "perceptual_weight": self.perceptual_weight,
            "disc_weight": self.disc_weight,
        }
        negative = [name for name, value in weights.items() if value < 0]
        if negative:
            raise ValueError(f"loss weights must be >= 0: {', '.join(negative)}")
        if self.opl_r <= 0:
            raise ValueError(f"opl_r must be positive, got {self.opl_r}")
        if self.perceptual_max_frames is not None and self.perceptual_max_frames < 1:
            raise ValueError(
                f"perceptual_max_frames must be >= 1 or None, got {self.perceptual_max_frames}"
            )
        if self.disc_kind not in _DISC_KINDS:
            raise ValueError(f"disc_kind must be one of {_DISC_KINDS}, got {self.disc_kind!r}")


class TAELoss(nn.Module):
    """The TAE objective: L1 + KL + OPL (+ perceptual) (+ GAN), and the
    discriminator's own loss.

    Submodules: ``perceptual`` (a :class:`PerceptualLoss`, or ``None`` when
    ``perceptual_weight`` is 0) and ``discriminator`` (a :class:`PatchDiscriminator`,
    or ``None`` when ``disc_weight`` is 0). The trainer owns the optimizers; the
    discriminator's parameters are ``loss.discriminator.parameters()``.

    Args:
        config: weights and switches.
        in_channels: video channels seen by the discriminator.

    Raises:
        ValueError: ``perceptual_weight > 0`` without ``perceptual_vgg_path``, or a
            linear-weights path without a VGG path.
    """

    def __init__(self, config: TAELossConfig, *, in_channels: int = _RGB_CHANNELS) -> None:
        super().__init__()
        self.config = config
        if config.perceptual_lin_path is not None and config.perceptual_vgg_path is None:
            raise ValueError("perceptual_lin_path is set but perceptual_vgg_path is not")
        self.perceptual: PerceptualLoss | None = None
        if config.perceptual_weight > 0:
            if config.perceptual_vgg_path is None:
                raise ValueError(
                    "perceptual_weight > 0 needs perceptual_vgg_path (local VGG16 weights; "
                    "nothing is downloaded); set perceptual_weight=0 to train without it"
                )
            self.perceptual = PerceptualLoss.from_file(
                config.perceptual_vgg_path, config.perceptual_lin_path
            )
        self.discriminator: PatchDiscriminator | None = None
        if config.disc_weight > 0:
            self.discriminator = PatchDiscriminator(
                in_channels,
                kind=config.disc_kind,
                width=config.disc_width,
                num_layers=config.disc_layers,
            )

    def opl_active(self, step: int) -> bool:
        """Whether the outlier penalty counts at ``step``."""
        return self.config.opl_weight > 0 and step >= self.config.opl_start_step

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial terms count at ``step``."""
        return self.discriminator is not None and step >= self.config.disc_start_step

    def generator_loss(
        self,
        video: torch.Tensor,
        reconstruction: torch.Tensor,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        latents: torch.Tensor,
        *,
        step: int,
        last_layer_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The autoencoder's loss.

        Args:
            video: input ``(B, 3, T, H, W)`` in ``[-1, 1]``.
            reconstruction: decoder output, same shape.
            mean, logvar: posterior ``(B, 16, T', H', W')``.
            latents: what OPL acts on; the posterior mean.
            step: training step, for the OPL and GAN start steps.
            last_layer_weight: the decoder's final weight, for the adaptive GAN
                weight. Without it, or when gradients are off (validation), the GAN
                term is weighted by ``disc_weight`` alone.

        Returns:
            ``(total, logs)``: the scalar to backpropagate and float logs under
            ``loss/total``, ``loss/l1``, ``loss/l2``, ``loss/gradient``, ``loss/kl``, ``loss/opl``,
            ``loss/perceptual``, ``loss/gan_g`` and ``gan/weight``. ``loss/opl`` is
            logged even before it counts, to watch latent dots appear.
        """
        config = self.config
        l1 = l1_reconstruction(reconstruction, video)
        l2 = (reconstruction - video).square().mean()
        kl = kl_divergence(mean, logvar)
        reconstruction_term = config.l1_weight * l1 + config.l2_weight * l2
        gradient = l1.new_zeros(())
        if config.gradient_weight > 0:
            gradient = spatial_gradient_loss(reconstruction, video)
            reconstruction_term = reconstruction_term + config.gradient_weight * gradient
        perceptual = l1.new_zeros(())
        if self.perceptual is not None:
            perceptual = self.perceptual(
                reconstruction, video, max_frames=config.perceptual_max_frames
            )
            reconstruction_term = reconstruction_term + config.perceptual_weight * perceptual
        total = reconstruction_term + config.kl_weight * kl

        if self.opl_active(step):
            opl = outlier_penalty_loss(latents, config.opl_r)
            total = total + config.opl_weight * opl
        else:
            with torch.no_grad():
                opl = outlier_penalty_loss(latents, config.opl_r)

        gan_g = l1.new_zeros(())
        gan_weight = l1.new_zeros(())
        if self.gan_active(step):
            assert self.discriminator is not None
            # The generator step must not leave gradients in the discriminator.
            with _frozen(self.discriminator):
                gan_g = hinge_g_loss(self.discriminator(reconstruction))
            gan_weight = l1.new_tensor(config.disc_weight)
            if (
                config.adaptive_disc_weight
                and last_layer_weight is not None
                and reconstruction_term.requires_grad
                and gan_g.requires_grad
            ):
                gan_weight = gan_weight * adaptive_gan_weight(
                    reconstruction_term, gan_g, last_layer_weight
                )
            total = total + gan_weight * gan_g

        logs = {
            "loss/total": total,
            "loss/l1": l1,
            "loss/l2": l2,
            "loss/gradient": gradient,
            "loss/kl": kl,
            "loss/opl": opl,
            "loss/perceptual": perceptual,
            "loss/gan_g": gan_g,
            "gan/weight": gan_weight,
        }
        return total, {key: float(value.detach()) for key, value in logs.items()}

    def discriminator_loss(
        self, video: torch.Tensor, reconstruction: torch.Tensor, *, step: int
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        """Hinge loss of the discriminator on real videos and (detached) reconstructions.

        Returns:
            ``None`` when there is no discriminator or ``step < disc_start_step`` (the
            trainer then skips the discriminator step entirely), else ``(loss, logs)``
            with ``loss/disc``, ``disc/real_logits`` and ``disc/fake_logits`` (mean
            logits).
        """
        if not self.gan_active(step):
            return None
        assert self.discriminator is not None
        real_logits = self.discriminator(video.detach())
        fake_logits = self.discriminator(reconstruction.detach())
        loss = hinge_d_loss(real_logits, fake_logits)
        logs = {
            "loss/disc": float(loss.detach()),
            "disc/real_logits": float(real_logits.detach().mean()),
            "disc/fake_logits": float(fake_logits.detach().mean()),
        }
        return loss, logs
