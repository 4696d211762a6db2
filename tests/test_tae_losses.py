"""Tests for the TAE losses: OPL, KL, perceptual, discriminator and the combined loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from moviegen.tae.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    TAELoss,
    TAELossConfig,
    VGG16Features,
    adaptive_gan_weight,
    frame_deviation_norms,
    hinge_d_loss,
    hinge_g_loss,
    kl_divergence,
    l1_reconstruction,
    outlier_penalty_loss,
    spatial_gradient_loss,
)

LATENT_CHANNELS = 8
FRAME = 16  # latent frames of FRAME x FRAME positions
OUTLIER_VALUE = 6.0  # per channel, i.e. a deviation norm near 6 * sqrt(8) ~ 17 std norms ~ 3


def _gaussian_latents(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _antipodal_frame(channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``(channels, height, width)`` whose deviations from the frame mean all have norm 1.

    Half the positions hold random unit vectors, the other half their negatives, so
    the mean is the constant offset and every OPL z-score is exactly 1.
    """
    half = height * width // 2
    directions = _gaussian_latents(channels, half, seed=seed)
    directions = directions / directions.norm(dim=0, keepdim=True)
    offset = torch.linspace(-1.0, 1.0, channels)[:, None]
    frame = torch.cat([directions, -directions], dim=1) + offset  # (C, H W)
    order = torch.randperm(height * width, generator=torch.Generator().manual_seed(seed))
    return frame[:, order].reshape(channels, height, width)


def _reference_opl(latents: torch.Tensor, r: float) -> float:
    """The paper's formula with explicit loops over samples, frames and positions."""
    batch, _, frames, height, width = latents.shape
    total = 0.0
    for b in range(batch):
        for t in range(frames):
            frame = latents[b, :, t].double()
            positions = [(i, j) for i in range(height) for j in range(width)]
            mean = sum(frame[:, i, j] for i, j in positions) / len(positions)
            var = sum((frame[:, i, j] - mean) ** 2 for i, j in positions) / len(positions)
            std_norm = math.sqrt(float(var.sum()))
            excess = 0.0
            for i, j in positions:
                deviation = math.sqrt(float(((frame[:, i, j] - mean) ** 2).sum()))
                excess += max(deviation - r * std_norm, 0.0)
            total += excess / len(positions)
    return total / (batch * frames)


# --- OPL --------------------------------------------------------------------------


def test_opl_is_zero_without_outliers():
    frame = _antipodal_frame(LATENT_CHANNELS, FRAME, FRAME)
    latents = frame[None, :, None]  # (1, C, 1, H, W)
    deviation_norm, std_norm = frame_deviation_norms(latents)
    torch.testing.assert_close(deviation_norm / std_norm[..., None, None], torch.ones(1, 1, 16, 16))
    assert outlier_penalty_loss(latents).item() == 0.0
    # A Gaussian frame with 16 channels: z^2 ~ chi2(16) / 16 never reaches 9 here.
    assert outlier_penalty_loss(_gaussian_latents(2, 16, 3, 8, 8)).item() == 0.0
    # A constant frame: no deviation at all, and a finite (zero) gradient.
    constant = torch.full((1, LATENT_CHANNELS, 2, 4, 4), 0.7, requires_grad=True)
    loss = outlier_penalty_loss(constant)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(constant.grad, torch.zeros_like(constant))


def _with_outliers(value: float, positions=((3, 4), (10, 12))) -> torch.Tensor:
    latents = _gaussian_latents(1, LATENT_CHANNELS, 1, FRAME, FRAME)
    for i, j in positions:
        latents[0, :, 0, i, j] = value
    return latents


def test_opl_positive_with_outliers_and_grows_with_magnitude():
    values = [outlier_penalty_loss(_with_outliers(v)).item() for v in (4.0, 6.0, 10.0, 20.0)]
    assert values[0] > 0
    assert all(a < b for a, b in itertools.pairwise(values)), values


def test_opl_radius_is_configurable():
    latents = _with_outliers(OUTLIER_VALUE)
    assert outlier_penalty_loss(latents, r=2.0) > outlier_penalty_loss(latents, r=3.0) > 0
    assert outlier_penalty_loss(latents, r=20.0).item() == 0.0
    with pytest.raises(ValueError, match="positive"):
        outlier_penalty_loss(latents, r=0.0)


def test_opl_matches_loop_reference():
    latents = _gaussian_latents(2, 4, 3, 5, 6, seed=1)
    latents[0, :, 1, 2, 3] = 9.0  # one outlier so the penalty is not trivially 0
    latents[1, :, 2, 0, 0] = -7.0
    for r in (1.0, 3.0):
        expected = _reference_opl(latents, r)
        assert expected > 0
        assert outlier_penalty_loss(latents, r=r).item() == pytest.approx(expected, rel=1e-5)


def test_opl_accepts_images_and_videos():
    video = _with_outliers(OUTLIER_VALUE)  # (1, C, 1, H, W)
    image = video[:, :, 0]  # (1, C, H, W)
    assert outlier_penalty_loss(image).item() == pytest.approx(outlier_penalty_loss(video).item())
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        outlier_penalty_loss(video[0, :, 0])


def test_opl_gradient_descent_removes_outliers_only():
    outliers = ((3, 4), (10, 12))
    start = _with_outliers(OUTLIER_VALUE, outliers)
    latents = start.clone().requires_grad_(True)
    # The OPL gradient at an outlier is a unit vector / (H W); this learning rate
    # moves an outlier about one unit per step.
    optimizer = torch.optim.SGD([latents], lr=FRAME * FRAME)
    for _ in range(30):
        optimizer.zero_grad()
        outlier_penalty_loss(latents).backward()
        optimizer.step()
    end = latents.detach()
    before, _ = frame_deviation_norms(start)
    after, _ = frame_deviation_norms(end)
    displacement = (end - start)[0, :, 0].norm(dim=0)  # (H, W)
    outlier_mask = torch.zeros(FRAME, FRAME, dtype=torch.bool)
    for i, j in outliers:
        outlier_mask[i, j] = True
        assert after[0, 0, i, j] < 0.6 * before[0, 0, i, j]
    assert outlier_penalty_loss(end).item() < 0.05 * outlier_penalty_loss(start).item()
    # Other positions move by a small fraction of what the outliers move.
    assert displacement[~outlier_mask].max() < 0.1 * displacement[outlier_mask].min()


# --- KL and L1 ----------------------------------------------------------------------


def test_kl_zero_at_prior_and_analytic_value():
    zeros = torch.zeros(2, 16, 1, 2, 2)
    assert kl_divergence(zeros, zeros).item() == 0.0
    mean = torch.full_like(zeros, 1.5)
    logvar = torch.full_like(zeros, math.log(2.0))
    expected = 0.5 * (1.5**2 + 2.0 - 1.0 - math.log(2.0))  # per element, so also the mean
    assert kl_divergence(mean, logvar).item() == pytest.approx(expected, rel=1e-6)
    # Per-element mean: independent of the latent size.
    assert kl_divergence(mean[:, :, :, :1], logvar[:, :, :, :1]).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(mean, logvar[:, :8])


def test_l1_reconstruction():
    target = torch.zeros(1, 3, 2, 4, 4)
    prediction = target.clone()
    prediction[..., :2] = 0.4  # half the elements off by 0.4
    assert l1_reconstruction(prediction, target).item() == pytest.approx(0.2)


def test_spatial_gradient_loss_charges_blur_not_offsets():
    # A vertical edge: columns 0-3 at -1, columns 4-7 at +1.
    sharp = torch.full((1, 3, 2, 8, 8), -1.0)
    sharp[..., 4:] = 1.0
    # A constant error has no gradient: nothing to charge.
    assert spatial_gradient_loss(sharp + 0.3, sharp).item() == pytest.approx(0.0, abs=1e-7)
    # Blurring the step over two pixel differences (-1, 0, +1): the width
    # differences are off by -1 and +1 where the target has one step of 2, in one
    # of 7 difference columns, each of the 8 rows: mean |.| = 2 / 7.
    blurred = sharp.clone()
    blurred[..., 3] = 0.0
    assert spatial_gradient_loss(blurred, sharp).item() == pytest.approx(2 / 7)
    # The same blur across the other axis costs the same.
    assert spatial_gradient_loss(
        blurred.transpose(-1, -2), sharp.transpose(-1, -2)
    ).item() == pytest.approx(2 / 7)
    with pytest.raises(ValueError, match="2x2"):
        spatial_gradient_loss(torch.zeros(1, 3, 1, 1, 8), torch.zeros(1, 3, 1, 1, 8))
    with pytest.raises(ValueError, match="shapes differ"):
        spatial_gradient_loss(torch.zeros(1, 3, 1, 4, 4), torch.zeros(1, 3, 1, 4, 5))


def test_gradient_weight_enters_the_total():
    video = torch.rand(1, 3, 2, 8, 8) * 2 - 1
    reconstruction = video + 0.1 * torch.randn_like(video)
    mean = logvar = torch.zeros(1, 16, 1, 1, 1)
    plain = TAELoss(TAELossConfig(l1_weight=1.0))
    sharp = TAELoss(TAELossConfig(l1_weight=1.0, gradient_weight=0.5))
    total_plain, _ = plain.generator_loss(video, reconstruction, mean, logvar, mean, step=0)
    total_sharp, logs = sharp.generator_loss(video, reconstruction, mean, logvar, mean, step=0)
    expected = spatial_gradient_loss(reconstruction, video).item()
    assert logs["loss/gradient"] == pytest.approx(expected)
    assert total_sharp.item() == pytest.approx(total_plain.item() + 0.5 * expected, rel=1e-6)
    with pytest.raises(ValueError, match="gradient_weight"):
        TAELossConfig(gradient_weight=-1.0)


# --- Perceptual ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    torch.manual_seed(0)
    state = {key: value.contiguous() for key, value in VGG16Features().state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file(state, str(path))
    return path


def test_vgg16_features_layout_matches_torchvision_names():
    features = VGG16Features()
    keys = list(features.state_dict())
    conv_indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert keys == [f"features.{i}.{name}" for i in conv_indices for name in ("weight", "bias")]
    taps = features(torch.zeros(1, 3, 32, 32))
    assert [tuple(tap.shape[1:]) for tap in taps] == [
        (64, 32, 32),
        (128, 16, 16),
        (256, 8, 8),
        (512, 4, 4),
        (512, 2, 2),
    ]


def test_perceptual_loss_from_file(vgg_file):
    loss_fn = PerceptualLoss.from_file(vgg_file)
    assert not loss_fn.training
    loss_fn.train()
    assert not loss_fn.training  # stays a frozen metric
    video = torch.rand(1, 3, 3, 16, 16) * 2 - 1  # the smallest frames VGG16 takes
    assert loss_fn(video, video).item() == 0.0
    prediction = (video + 0.2 * torch.randn_like(video)).requires_grad_(True)
    distance = loss_fn(prediction, video, max_frames=2)
    assert distance.item() > 0
    distance.backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    # Only the two kept frames (first and last) receive gradient.
    assert prediction.grad[:, :, 1].abs().sum() == 0
    assert all(parameter.grad is None for parameter in loss_fn.parameters())
    assert not any(parameter.requires_grad for parameter in loss_fn.parameters())
    # Images are one-frame videos.
    assert loss_fn(video[:, :, 0], video[:, :, 0]).item() == 0.0


def test_perceptual_loss_with_lin_weights(vgg_file, tmp_path):
    channels = (64, 128, 256, 512, 512)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(channels)}
    lin_path = tmp_path / "lin.pt"
    torch.save(lin, lin_path)
    loss_fn = PerceptualLoss.from_file(vgg_file, lin_path)
    assert loss_fn.lin is not None
    torch.testing.assert_close(loss_fn.lin[4].weight, lin["lin4.model.1.weight"])
    video = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    assert loss_fn(video.flip(-1), video).item() > 0


def test_perceptual_loss_file_errors(vgg_file, tmp_path):
    with pytest.raises(FileNotFoundError):
        PerceptualLoss.from_file(tmp_path / "absent.safetensors")
    state = VGG16Features().state_dict()
    del state["features.10.weight"]
    partial = tmp_path / "partial.pt"
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"features\.10\.weight"):
        PerceptualLoss.from_file(partial)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        PerceptualLoss.from_file(garbage)
    with pytest.raises(ValueError, match=r"lin\.0\.weight"):
        PerceptualLoss.from_file(vgg_file, partial)


# --- Discriminator ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["2.5d", "3d"])
def test_discriminator_output_shape(kind):
    discriminator = PatchDiscriminator(3, kind=kind, width=8, num_layers=3)
    logits = discriminator(torch.randn(2, 3, 8, 32, 32))
    # 32 -> 16 -> 8 -> 4 (stride 2), -> 3 -> 2 (stride-1 kernel-4 layers); time kept.
    assert logits.shape == (2, 1, 8, 2, 2)
    assert discriminator(torch.randn(2, 3, 32, 32)).shape == (2, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="too small"):
        discriminator(torch.randn(1, 3, 2, 16, 16))


def test_discriminator_kinds_differ_and_bad_kind_fails():
    spatial_temporal = PatchDiscriminator(3, kind="2.5d", width=8, num_layers=2)
    full = PatchDiscriminator(3, kind="3d", width=8, num_layers=2)
    first_2p5d = spatial_temporal.layers[0].layers
    assert [tuple(conv.kernel_size) for conv in first_2p5d] == [(1, 4, 4), (3, 1, 1)]
    assert tuple(full.layers[0].layers[0].kernel_size) == (3, 4, 4)
    with pytest.raises(ValueError, match="kind"):
        PatchDiscriminator(3, kind="2d")


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2 -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_gan_weight_is_ratio_of_gradient_norms():
    torch.manual_seed(0)
    inputs = torch.randn(5, 4)
    weight = nn.Parameter(torch.randn(3, 4))
    outputs = inputs @ weight.T  # (5, 3): a linear "last layer"
    reconstruction = outputs.abs().mean()
    gan = (outputs**2).sum()
    result = adaptive_gan_weight(reconstruction, gan, weight)
    # Gradients w.r.t. the weight by hand: d mean|o| = sign(o)^T x / N, d sum o^2 = 2 o^T x.
    with torch.no_grad():
        rec_grad = outputs.sign().T @ inputs / outputs.numel()
        gan_grad = 2 * outputs.T @ inputs
    expected = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    assert result.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not result.requires_grad
    # Graphs are retained: the caller can still backpropagate.
    clamped = adaptive_gan_weight(gan, 1e-12 * reconstruction, weight, max_weight=10.0)
    assert clamped.item() == 10.0
    (reconstruction + result * gan).backward()
    assert weight.grad is not None


# --- TAELoss ------------------------------------------------------------------------


def _tae_batch(seed: int = 0):
    """A video, a reconstruction from a one-conv "decoder", and latents with an outlier."""
    torch.manual_seed(seed)
    video = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    decoder = nn.Conv3d(3, 3, kernel_size=1)
    reconstruction = torch.tanh(decoder(video + 0.1 * torch.randn_like(video)))
    mean = torch.randn(1, 16, 1, 4, 4)
    mean[0, :, 0, 1, 2] = 10.0
    logvar = torch.zeros_like(mean)
    return video, reconstruction, mean, logvar, decoder


def test_l2_term_is_weighted_mean_squared_error():
    video, reconstruction, mean, logvar, _ = _tae_batch()
    loss = TAELoss(TAELossConfig(l1_weight=0.0, l2_weight=3.0, kl_weight=0.0, opl_weight=0.0))
    total, logs = loss.generator_loss(video, reconstruction, mean, logvar, mean, step=0)
    expected = (reconstruction - video).square().mean()
    assert logs["loss/l2"] == pytest.approx(expected.item())
    assert total.item() == pytest.approx(3.0 * expected.item(), rel=1e-6)


def test_tae_loss_opl_counts_only_after_start_step():
    loss = TAELoss(TAELossConfig(opl_weight=2.0, opl_start_step=100))
    video, reconstruction, mean, logvar, _ = _tae_batch()
    before, logs_before = loss.generator_loss(video, reconstruction, mean, logvar, mean, step=99)
    after, logs_after = loss.generator_loss(video, reconstruction, mean, logvar, mean, step=100)
    assert loss.perceptual is None and loss.discriminator is None
    assert logs_before["loss/opl"] > 0
    assert logs_before["loss/opl"] == pytest.approx(logs_after["loss/opl"])
    base = logs_before["loss/l1"] + 1e-6 * logs_before["loss/kl"]
    assert before.item() == pytest.approx(base, rel=1e-6)
    assert after.item() == pytest.approx(base + 2.0 * logs_after["loss/opl"], rel=1e-6)
    assert logs_after["loss/total"] == pytest.approx(after.item())
    assert set(logs_after) == {
        "loss/total",
        "loss/l1",
        "loss/l2",
        "loss/gradient",
        "loss/kl",
        "loss/opl",
        "loss/perceptual",
        "loss/gan_g",
        "gan/weight",
    }


def test_tae_loss_gan_counts_only_after_start_step():
    config = TAELossConfig(opl_weight=0.0, disc_weight=0.5, disc_start_step=10, disc_width=8)
    loss = TAELoss(config)
    video, reconstruction, mean, logvar, decoder = _tae_batch()
    _, logs = loss.generator_loss(
        video, reconstruction, mean, logvar, mean, step=9, last_layer_weight=decoder.weight
    )
    assert logs["loss/gan_g"] == 0.0 and logs["gan/weight"] == 0.0
    assert loss.discriminator_loss(video, reconstruction, step=9) is None

    total, logs = loss.generator_loss(
        video, reconstruction, mean, logvar, mean, step=10, last_layer_weight=decoder.weight
    )
    assert logs["gan/weight"] > 0 and logs["loss/gan_g"] != 0.0
    expected = logs["loss/l1"] + 1e-6 * logs["loss/kl"] + logs["gan/weight"] * logs["loss/gan_g"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert decoder.weight.grad is not None
    # The generator step leaves the discriminator untouched, and trainable.
    assert all(p.grad is None and p.requires_grad for p in loss.discriminator.parameters())

    disc_loss, disc_logs = loss.discriminator_loss(video, reconstruction, step=10)
    assert set(disc_logs) == {"loss/disc", "disc/real_logits", "disc/fake_logits"}
    disc_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())

    # Without the adaptive weight the GAN term is weighted by disc_weight alone.
    fixed = TAELoss(TAELossConfig(disc_weight=0.5, disc_width=8, adaptive_disc_weight=False))
    _, logs = fixed.generator_loss(video, reconstruction, mean, logvar, mean, step=0)
    assert logs["gan/weight"] == 0.5


def test_tae_loss_config_errors():
    with pytest.raises(ValueError, match="perceptual_vgg_path"):
        TAELoss(TAELossConfig(perceptual_weight=0.1))
    with pytest.raises(ValueError, match="opl_weight"):
        TAELossConfig(opl_weight=-1.0)
    with pytest.raises(ValueError, match="disc_kind"):
        TAELossConfig(disc_kind="2d")


def test_tae_loss_with_perceptual(vgg_file):
    config = TAELossConfig(
        perceptual_weight=0.5, perceptual_vgg_path=str(vgg_file), perceptual_max_frames=1
    )
    loss = TAELoss(config)
    assert loss.perceptual is not None
    video, reconstruction, mean, logvar, _ = _tae_batch()
    total, logs = loss.generator_loss(video, reconstruction, mean, logvar, mean, step=0)
    assert logs["loss/perceptual"] > 0
    expected = (
        logs["loss/l1"] + 1e-6 * logs["loss/kl"] + logs["loss/opl"] + 0.5 * logs["loss/perceptual"]
    )
    assert total.item() == pytest.approx(expected, rel=1e-5)
