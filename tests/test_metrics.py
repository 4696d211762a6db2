"""Tests for reconstruction metrics (PSNR, SSIM) and latent outlier statistics."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moviegen.eval.metrics import latent_outlier_stats, psnr, ssim

DATA_RANGE = 2.0  # videos in [-1, 1]


def _smooth_video(batch: int = 2, frames: int = 2, size: int = 24) -> torch.Tensor:
    """Structured content in [-0.8, 0.8]: plane waves differing per channel and frame."""
    coords = torch.linspace(0, 2 * math.pi, size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    video = torch.empty(batch, 3, frames, size, size)
    for b in range(batch):
        for c in range(3):
            for t in range(frames):
                video[b, c, t] = 0.8 * torch.sin((1 + c) * rows + (1 + b) * cols + 0.3 * t)
    return video


# --- PSNR ---------------------------------------------------------------------------


def test_psnr_known_value_uses_range_two():
    target = _smooth_video()
    error = 0.1
    values = psnr(target + error, target)
    expected = 20 * math.log10(DATA_RANGE / error)  # 26.02 dB, not the 20 dB of range 1
    assert values.shape == (2,)
    torch.testing.assert_close(values, torch.full((2,), expected), rtol=1e-5, atol=1e-4)
    # Explicit data range: [0, 1] data with the same error.
    assert psnr(target + error, target, data_range=1.0)[0].item() == pytest.approx(20.0, abs=1e-3)


def test_psnr_identical_is_inf_and_per_sample():
    target = _smooth_video()
    prediction = target.clone()
    prediction[1] += 0.2
    values = psnr(prediction, target)
    assert math.isinf(values[0].item()) and values[0] > 0
    assert values[1].item() == pytest.approx(20 * math.log10(DATA_RANGE / 0.2), rel=1e-5)
    # Images (B, C, H, W) work too.
    assert torch.isinf(psnr(target[:, :, 0], target[:, :, 0])).all()


def test_psnr_does_not_clamp():
    target = torch.ones(1, 3, 1, 4, 4)
    # 1.5 is out of range; clamping would make the error vanish.
    assert psnr(target + 0.5, target)[0].item() == pytest.approx(20 * math.log10(4.0), rel=1e-5)


def test_psnr_shape_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 3, 2, 8, 8), torch.zeros(1, 3, 1, 8, 8))
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


# --- SSIM ---------------------------------------------------------------------------


def test_ssim_identical_is_one():
    video = _smooth_video()
    torch.testing.assert_close(ssim(video, video), torch.ones(2))
    torch.testing.assert_close(ssim(video[:, :, 0], video[:, :, 0]), torch.ones(2))


def test_ssim_drops_monotonically_with_noise():
    video = _smooth_video(batch=1)
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(0))
    values = [
        ssim(video + level * noise, video).item() for level in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
    ]
    assert values[0] == pytest.approx(1.0, abs=1e-5)
    assert all(a > b for a, b in itertools.pairwise(values)), values
    assert values[-1] < 0.5


def test_ssim_constant_frames_match_luminance_term():
    mu_x, mu_y = 0.3, -0.2
    x = torch.full((1, 3, 2, 16, 16), mu_x)
    y = torch.full((1, 3, 2, 16, 16), mu_y)
    # Zero variance: the contrast-structure term is C2 / C2 = 1.
    c1 = (0.01 * DATA_RANGE) ** 2
    expected = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-5)


def _reference_ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5):
    """Wang et al. on one (C, H, W) frame, window by window, in float64."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    profile = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = torch.outer(profile, profile) / profile.sum() ** 2
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a = x[c, i : i + size, j : j + size].double()
                b = y[c, i : i + size, j : j + size].double()
                mu_a, mu_b = (weights * a).sum(), (weights * b).sum()
                var_a = (weights * (a - mu_a) ** 2).sum()
                var_b = (weights * (b - mu_b) ** 2).sum()
                cov = (weights * (a - mu_a) * (b - mu_b)).sum()
                values.append(
                    (2 * mu_a * mu_b + c1)
                    * (2 * cov + c2)
                    / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
                )
    return float(torch.stack(values).mean())


def test_ssim_matches_windowed_reference():
    target = _smooth_video(batch=1, frames=1, size=16)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    prediction = 0.7 * target + 0.1 + 0.2 * noise
    expected = _reference_ssim(prediction[0, :, 0], target[0, :, 0])
    assert ssim(prediction, target).item() == pytest.approx(expected, abs=1e-5)


def test_ssim_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 15))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(1, 3, 2, 10, 16), torch.zeros(1, 3, 2, 10, 16))
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        ssim(torch.zeros(16, 16), torch.zeros(16, 16))
    with pytest.raises(ValueError, match="odd"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), window_size=4)


# --- Latent outlier statistics --------------------------------------------------------


def _constant_norm_latents(channels: int = 16, size: int = 8) -> torch.Tensor:
    """``(1, C, 1, size, size)``: deviations from the frame mean all of norm 1 (z = 1)."""
    half = size * size // 2
    directions = torch.randn(channels, half, generator=torch.Generator().manual_seed(0))
    directions = directions / directions.norm(dim=0, keepdim=True)
    frame = torch.cat([directions, -directions], dim=1) + 0.5  # mean is 0.5 per channel
    return frame.reshape(1, channels, 1, size, size)


def test_latent_outlier_stats_clean_frames():
    stats = latent_outlier_stats(_constant_norm_latents())
    assert stats["frac_above_3"] == 0.0 and stats["frac_above_5"] == 0.0
    assert stats["max_zscore"] == pytest.approx(1.0, abs=1e-5)
    assert stats["mean_zscore"] == pytest.approx(1.0, abs=1e-5)
    assert stats["max_abs"] == pytest.approx(float(_constant_norm_latents().abs().max()))
    gaussian = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert latent_outlier_stats(gaussian)["frac_above_3"] == 0.0
    # Constant frames have no spread: z-scores are 0, not NaN.
    constant = latent_outlier_stats(torch.full((1, 16, 1, 4, 4), 2.0))
    assert constant["max_zscore"] == 0.0 and constant["max_abs"] == 2.0


def test_latent_outlier_stats_finds_planted_outlier():
    latents = torch.randn(1, 16, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    latents[0, :, 1, 5, 7] = 12.0  # one "latent dot" in the second frame
    stats = latent_outlier_stats(latents)
    assert stats["max_zscore"] > 5
    positions = latents.shape[0] * latents.shape[2] * 16 * 16
    assert stats["frac_above_5"] == pytest.approx(1 / positions)
    assert stats["frac_above_3"] >= stats["frac_above_5"]
    assert stats["max_abs"] == 12.0
    # Images (B, C, H, W) are accepted as one-frame videos.
    assert latent_outlier_stats(latents[:, :, 1])["max_zscore"] == pytest.approx(
        stats["max_zscore"]
    )
