"""Reconstruction metrics (PSNR, SSIM) and latent outlier statistics for the TAE.

Videos are ``(B, C, T, H, W)`` (images ``(B, C, H, W)``) in ``[-1, 1]``, so the
peak-to-peak range is 2. The earlier unofficial implementation computed PSNR as if
the data were in ``[0, 1]`` (range 1), which under-reports by
``20 * log10(2) ~ 6.02 dB``; every function here takes ``data_range`` explicitly and
defaults to 2. Inputs are **not** clamped: callers clamp decoder outputs to
``[-1, 1]`` first (as they would before writing a video), so a metric never hides
out-of-range values.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from moviegen.tae.losses import frame_deviation_norms

__all__ = ["latent_outlier_stats", "psnr", "ssim"]

# Peak-to-peak range of videos in [-1, 1].
DEFAULT_DATA_RANGE = 2.0
# Wang et al. (2004) SSIM: 11x11 Gaussian window, sigma 1.5, stabilisers
# C1 = (K1 L)^2 and C2 = (K2 L)^2 for data range L.
DEFAULT_SSIM_WINDOW = 11
DEFAULT_SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# OPL z-score thresholds reported by latent_outlier_stats; 3 is the paper's OPL radius.
ZSCORE_THRESHOLDS = (3.0, 5.0)
# Below this ||std|| a frame is constant and every z-score is taken as 0.
_MIN_STD_NORM = 1e-12


def _check_pair(prediction: torch.Tensor, target: torch.Tensor) -> None:
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target shapes differ: {tuple(prediction.shape)} "
            f"vs {tuple(target.shape)}"
        )
    if prediction.ndim not in (4, 5):
        raise ValueError(
            f"expected (B, C, T, H, W) or (B, C, H, W), got shape {tuple(prediction.shape)}"
        )


def psnr(
    prediction: torch.Tensor, target: torch.Tensor, *, data_range: float = DEFAULT_DATA_RANGE
) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample, ``10 log10(data_range^2 / MSE)``.

    The MSE is over all of C, T, H, W of a sample (not a mean of per-frame PSNRs).
    ``data_range`` is 2 for ``[-1, 1]`` data; values are not clamped (module docstring).

    Args:
        prediction, target: ``(B, C, T, H, W)`` or ``(B, C, H, W)``.
        data_range: peak-to-peak range of the data.

    Returns:
        ``(B,)`` float32 in dB; ``+inf`` where the inputs are identical.
    """
    _check_pair(prediction, target)
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    error = (prediction.float() - target.float()).flatten(1)
    mse = error.square().mean(dim=1)  # (B,)
    # log10 of 0 is -inf, so identical samples come out as +inf without a special case.
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised 2D Gaussian ``(size, size)``."""
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    profile = torch.exp(-(offsets**2) / (2 * sigma**2))
    profile = profile / profile.sum()
    return torch.outer(profile, profile)


def ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    data_range: float = DEFAULT_DATA_RANGE,
    window_size: int = DEFAULT_SSIM_WINDOW,
    sigma: float = DEFAULT_SSIM_SIGMA,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per sample.

    Computed per frame and channel with a Gaussian window and 'valid' positions
    only (no padding), then averaged over channels, frames and positions. Local
    variances use the window weights as given (no unbiasing), as in the reference
    implementation.

    Args:
        prediction, target: ``(B, C, T, H, W)`` or ``(B, C, H, W)``; H and W at least
            ``window_size``.
        data_range: peak-to-peak range of the data (2 for ``[-1, 1]``).
        window_size: side of the Gaussian window (odd).
        sigma: std of the Gaussian window in pixels.

    Returns:
        ``(B,)`` float32; 1 for identical inputs.
    """
    _check_pair(prediction, target)
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    if window_size < 1 or window_size % 2 == 0 or sigma <= 0:
        raise ValueError(
            f"window_size must be odd and positive and sigma positive, got {window_size}, {sigma}"
        )
    if min(prediction.shape[-2:]) < window_size:
        raise ValueError(
            f"frames of {tuple(prediction.shape[-2:])} are smaller than the "
            f"{window_size}x{window_size} SSIM window"
        )
    if prediction.ndim == 4:
        prediction, target = prediction.unsqueeze(2), target.unsqueeze(2)
    batch, channels, frames, height, width = prediction.shape

    def fold(video: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B T, C, H, W)
        return video.float().transpose(1, 2).reshape(batch * frames, channels, height, width)

    x, y = fold(prediction), fold(target)
    # Local statistics of frame-centred values: variances are differences of second
    # moments, which cancel badly in float32 when the mean is large relative to the
    # spread; centring removes most of the mean first and changes no variance.
    x_mean = x.mean(dim=(-2, -1), keepdim=True)  # (B T, C, 1, 1)
    y_mean = y.mean(dim=(-2, -1), keepdim=True)
    x, y = x - x_mean, y - y_mean
    # One depthwise convolution for all five local statistics.
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B T, 5 C, H, W)
    window = _gaussian_window(window_size, sigma).to(stacked.device)
    kernel = window.expand(stacked.shape[1], 1, window_size, window_size)
    local = F.conv2d(stacked, kernel, groups=stacked.shape[1])  # (B T, 5 C, h, w)
    mu_xc, mu_yc, e_xx, e_yy, e_xy = local.chunk(5, dim=1)
    var_x = e_xx - mu_xc.square()
    var_y = e_yy - mu_yc.square()
    cov_xy = e_xy - mu_xc * mu_yc
    mu_x, mu_y = mu_xc + x_mean, mu_yc + y_mean
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    )  # (B T, C, h, w)
    # Every frame has the same number of positions, so this is the mean over all.
    return ssim_map.reshape(batch, -1).mean(dim=1)


@torch.no_grad()
def latent_outlier_stats(latents: torch.Tensor) -> dict[str, float]:
    """How strongly a batch of latents shows "latent dots" (MOVIEGEN.md section 1).

    Per sample and frame, every spatial position gets the OPL z-score
    ``||X_ij - mean(X)|| / ||std(X)||`` (population std over positions; see
    :func:`moviegen.tae.losses.frame_deviation_norms`). Its root-mean-square over a
    frame is 1 by construction, so the fraction above ``z`` is at most ``1 / z^2``;
    a healthy latent has ``frac_above_3`` near 0 and a ``max_zscore`` of a few.

    Args:
        latents: ``(B, C, T, H, W)`` (or ``(B, C, H, W)``).

    Returns:
        ``max_zscore``, ``mean_zscore``, ``frac_above_3``, ``frac_above_5`` (over all
        positions of all samples and frames) and ``max_abs`` (largest absolute
        latent value). Constant frames have z-score 0.
    """
    deviation_norm, std_norm = frame_deviation_norms(latents)  # (B, T, H, W), (B, T)
    std_norm = std_norm[..., None, None]
    zscore = torch.where(
        std_norm > _MIN_STD_NORM,
        deviation_norm / std_norm.clamp_min(_MIN_STD_NORM),
        torch.zeros_like(deviation_norm),
    )
    stats = {
        "max_zscore": float(zscore.max()),
        "mean_zscore": float(zscore.mean()),
    }
    for threshold in ZSCORE_THRESHOLDS:
        stats[f"frac_above_{threshold:g}"] = float((zscore > threshold).float().mean())
    stats["max_abs"] = float(latents.detach().abs().max())
    return stats
