"""TAE model: shapes for any length and size, tiling parity, stats, bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moviegen.tae.model import (
    TAE,
    PixelRMSNorm,
    TAEConfig,
    _PixelRMSNormFunction,
    channel_average,
    level_frame_counts,
    pool_shortcut,
    tae_recipe,
    temporal_conv,
    upsample_shortcut,
)
from moviegen.tae.tiling import blend_weights, decode_tiled, tile_starts

VARIANTS = {
    "plain": {},
    "shortcuts": {"residual_shortcuts": True},
    "pixelnorm": {"norm": "pixel", "residual_shortcuts": True},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tae(request) -> TAE:
    """The debug TAE as in the paper, with residual shortcuts, and with pixel norms."""
    torch.manual_seed(0)
    return TAE(replace(tae_recipe("debug"), **VARIANTS[request.param])).eval()


def random_video(batch: int, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=generator) * 2 - 1


@pytest.mark.parametrize("frames", [1, 7, 8, 9, 16, 33, 64])
def test_any_length_gives_ceil_t_over_8_latent_frames(tae, frames):
    video = random_video(2, frames, 16, 24)
    with torch.no_grad():
        reconstruction, mean, logvar = tae(video)
    assert mean.shape == logvar.shape == (2, 16, math.ceil(frames / 8), 2, 3)
    assert reconstruction.shape == video.shape


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40), (40, 16), (30, 20), (17, 9)])
def test_spatial_sizes_pad_to_multiples_of_8(tae, height, width):
    video = random_video(1, 9, height, width)
    with torch.no_grad():
        reconstruction, mean, _ = tae(video, sample=False)
    assert mean.shape[-2:] == (math.ceil(height / 8), math.ceil(width / 8))
    assert reconstruction.shape == video.shape, "the training pass crops back to the input"
    decoded = tae.decode_latents(mean, num_frames=9)
    assert decoded.shape[-2:] == (8 * math.ceil(height / 8), 8 * math.ceil(width / 8))


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_elements_are_independent(tae, batch):
    video = random_video(batch, 8, 16, 16)
    with torch.no_grad():
        together, _, _ = tae(video, sample=False)
        alone = torch.cat([tae(clip[None], sample=False)[0] for clip in video])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_level_frame_counts():
    assert level_frame_counts(33, 4) == [33, 17, 9, 5]
    assert level_frame_counts(1, 4) == [1, 1, 1, 1]
    assert level_frame_counts(64, 4) == [64, 32, 16, 8]
    # Temporal compression 4: the last stage keeps the frame count.
    assert level_frame_counts(33, 4, temporal_levels=2) == [33, 17, 9, 9]
    assert level_frame_counts(16, 4, temporal_levels=0) == [16, 16, 16, 16]


@pytest.mark.parametrize("compression", [1, 2, 4, 8])
@pytest.mark.parametrize("frames", [1, 5, 16, 19])
def test_temporal_compression_gives_ceil_t_over_it_latent_frames(compression, frames):
    """Space is compressed 8x for every setting; time by ``temporal_compression``
    (stride-2 stages first, the rest spatial only), and the decoder undoes it."""
    config = replace(
        tae_recipe("debug"), norm="pixel", residual_shortcuts=True, temporal_compression=compression
    )
    torch.manual_seed(0)
    model = TAE(config).eval()
    halving = [stage.halves_time for stage in model.encoder.levels if hasattr(stage, "halves_time")]
    assert halving == [level < int(math.log2(compression)) for level in range(3)]
    video = random_video(2, frames, 16, 24)
    with torch.no_grad():
        reconstruction, mean, _ = model(video, sample=False)
        decoded = model.decode_latents(mean)
    assert mean.shape == (2, 16, math.ceil(frames / compression), 2, 3)
    assert reconstruction.shape == video.shape
    assert decoded.shape[2] == mean.shape[2] * compression, "default length: T' x compression"


def test_temporal_compression_4_latent_frames_see_their_own_four_frames():
    """Untrained (temporal convolutions start as the identity; no attention, whose
    temporal half mixes frames), latent frame j sees exactly frames 4j..4j+3."""
    config = replace(
        tae_recipe("debug"),
        norm="pixel",
        residual_shortcuts=True,
        attention=False,
        temporal_compression=4,
    )
    model = TAE(config).eval()
    blocks = torch.stack([torch.full((1, 3, 4, 16, 16), value) for value in (-0.6, 0.2, 0.7)], 2)
    video = blocks.flatten(2, 3)  # (1, 3, 12, 16, 16): three constant 4-frame blocks
    with torch.no_grad():
        stages = [stage for stage in model.encoder.levels if hasattr(stage, "spatial_down")]
        for module in [model.encoder.conv_out] + [s.spatial_down for s in stages]:
            for parameter in module.parameters():
                parameter.zero_()
        mean = model.encode_moments(video)[:, :16]
    assert mean.shape[2] == 3
    # Each latent frame sees only its own block: the three frames differ, and a
    # change inside block 2 moves only latent frame 2.
    assert not torch.allclose(mean[:, :, 0], mean[:, :, 1])
    changed = video.clone()
    changed[:, :, 8:] = 0.0
    with torch.no_grad():
        other = model.encode_moments(changed)[:, :16]
    torch.testing.assert_close(other[:, :, :2], mean[:, :, :2], atol=1e-6, rtol=0)
    assert not torch.allclose(other[:, :, 2], mean[:, :, 2])


def test_frames_do_not_leak_across_encoder_chunks(tae):
    """The encoder's 32-frame chunks are independent: changing frames 32+ leaves
    the latents of the first chunk untouched."""
    video = random_video(1, 64, 16, 16)
    changed = video.clone()
    changed[:, :, 32:] = random_video(1, 32, 16, 16, seed=5)
    with torch.no_grad():
        first = tae.encode_moments(video)
        second = tae.encode_moments(changed)
    torch.testing.assert_close(first[:, :, :4], second[:, :, :4], atol=0, rtol=0)
    assert not torch.allclose(first[:, :, 4:], second[:, :, 4:])


def test_tiled_encoding_equals_whole_clip_encoding(tae):
    video = random_video(1, 96, 32, 32)
    with torch.no_grad():
        whole = tae.encode_moments(video)
        tiled = tae.encode_moments(video, chunks_at_once=1)
    assert whole.shape == (1, 32, 12, 4, 4)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


def test_tile_starts_and_blend_weights():
    assert tile_starts(12, 4, 2) == [0, 2, 4, 6, 8]
    assert tile_starts(11, 4, 2) == [0, 2, 4, 6, 7]
    assert tile_starts(3, 4, 2) == [0]
    spans = [(0, 32), (16, 48), (32, 64)]
    weights = blend_weights(spans)
    total = torch.zeros(64, dtype=torch.float64)
    for (begin, end), weight in zip(spans, weights, strict=True):
        total[begin:end] += weight
    torch.testing.assert_close(total, torch.ones(64, dtype=torch.float64))
    assert weights[0][:16].eq(1).all() and weights[0][16:].diff().lt(0).all()
    with pytest.raises(ValueError):
        tile_starts(10, 4, 4)


def test_tiled_decoding_of_a_local_decoder_is_exact():
    """With an exactly local decode function, tiling and blending change nothing."""
    latents = torch.randn(1, 16, 12, 2, 3)

    def decode(piece: torch.Tensor, num_frames: int) -> torch.Tensor:
        # Each latent frame becomes 8 frames of its first 3 channels, upsampled 8x.
        video = piece[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3)
        return video.repeat_interleave(8, 4)[:, :, :num_frames]

    whole = decode(latents, 91)
    tiled = decode_tiled(decode, latents, num_frames=91)
    torch.testing.assert_close(tiled, whole)
    spatial = decode_tiled(
        decode, latents, num_frames=91, spatial_tile_latents=2, spatial_overlap_latents=1
    )
    torch.testing.assert_close(spatial, whole)

    def decode_4(piece: torch.Tensor, num_frames: int) -> torch.Tensor:
        # As above with 4 frames per latent frame.
        video = piece[:, :3].repeat_interleave(4, 2).repeat_interleave(8, 3)
        return video.repeat_interleave(8, 4)[:, :, :num_frames]

    tiled_4 = decode_tiled(decode_4, latents, num_frames=46, temporal_compression=4)
    torch.testing.assert_close(tiled_4, decode_4(latents, 46))
    with pytest.raises(ValueError, match="91 frames need 23 latent frames, got 12"):
        decode_tiled(decode_4, latents, num_frames=91, temporal_compression=4)


def test_normalised_encode_decode_round_trip_shapes(tae):
    model = TAE(tae_recipe("debug")).eval()
    video = random_video(1, 40, 16, 24)
    with pytest.raises(ValueError, match="latent statistics"):
        model.encode(video)
    model.set_latent_stats(torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16))
    latents = model.encode(video)
    assert latents.shape == (1, 16, 5, 2, 3)
    raw, _ = model.split_moments(model.encode_moments(video))
    torch.testing.assert_close(
        latents * model.latent_std.view(1, -1, 1, 1, 1) + model.latent_mean.view(1, -1, 1, 1, 1),
        raw,
        atol=1e-5,
        rtol=1e-5,
    )
    decoded = model.decode(latents, num_frames=40, frame_size=(16, 24))
    assert decoded.shape == video.shape
    assert decoded.abs().max() <= 1
    with pytest.raises(ValueError, match="positive"):
        model.set_latent_stats(torch.zeros(16), torch.zeros(16))


@pytest.mark.parametrize(
    ("video", "error", "match"),
    [
        (torch.zeros(3, 8, 16, 16), ValueError, r"\(B, C, T, H, W\)"),
        (torch.zeros(1, 4, 8, 16, 16), ValueError, "channels"),
        (torch.zeros(1, 3, 0, 16, 16), ValueError, "empty"),
        (torch.full((1, 3, 8, 16, 16), float("nan")), ValueError, "NaN"),
        (torch.zeros(1, 3, 8, 16, 16, dtype=torch.int64), TypeError, "float"),
    ],
)
def test_bad_input_gives_clear_errors(tae, video, error, match):
    with pytest.raises(error, match=match):
        tae(video)


def test_bad_latents_and_frame_counts(tae):
    with pytest.raises(ValueError, match="latents must be"):
        tae.decode_latents(torch.zeros(1, 8, 2, 2, 2))
    with pytest.raises(ValueError, match="need 2 latent frames"):
        tae.decode_latents(torch.zeros(1, 16, 3, 2, 2), num_frames=16)


def test_shortcuts_pool_and_upsample_are_inverse_on_blockwise_constant_video():
    coarse = random_video(2, 3, 4, 5)  # (B, C, T, H, W) at half resolution
    fine = upsample_shortcut(coarse, num_frames=6)
    assert fine.shape == (2, 3, 6, 8, 10)
    torch.testing.assert_close(pool_shortcut(fine), coarse)
    # An odd frame count repeats the last frame before pooling.
    odd = upsample_shortcut(coarse, num_frames=5)
    assert odd.shape[2] == 5
    torch.testing.assert_close(pool_shortcut(odd), coarse)
    # Channel groups: consecutive channels are averaged.
    features = torch.arange(8.0).view(1, 8, 1, 1, 1)
    assert channel_average(features, 2).flatten().tolist() == [1.5, 5.5]


def test_shortcuts_carry_a_constant_colour_through_the_untrained_bottleneck():
    """With the learned downsampling layers and the latent projection zeroed,
    the latents cannot see the input, unless the shortcuts carry it."""
    outputs = {}
    for shortcuts in (False, True):
        torch.manual_seed(0)
        model = TAE(replace(tae_recipe("debug"), residual_shortcuts=shortcuts)).eval()
        with torch.no_grad():
            stages = [stage for stage in model.encoder.levels if hasattr(stage, "spatial_down")]
            zeroed = [model.encoder.conv_out]
            zeroed += [
                layer for stage in stages for layer in (stage.spatial_down, stage.temporal_down)
            ]
            for module in zeroed:
                for parameter in module.parameters():
                    parameter.zero_()
            dark, bright = (torch.full((1, 3, 8, 16, 16), value) for value in (-0.5, 0.5))
            outputs[shortcuts] = [model.encode_moments(v)[:, :16] for v in (dark, bright)]
    torch.testing.assert_close(outputs[False][0], outputs[False][1], msg="no shortcut: blind")
    assert not torch.allclose(outputs[True][0], outputs[True][1]), "shortcut carries colour"


@pytest.mark.parametrize("frames", [1, 2, 5, 8])
@pytest.mark.parametrize("stride", [1, 2])
def test_temporal_conv_equals_a_3d_convolution_of_the_replicate_padded_video(frames, stride):
    torch.manual_seed(frames)
    conv = torch.nn.Conv3d(6, 4, (3, 1, 1), stride=(stride, 1, 1))
    video = torch.randn(2, 6, frames, 5, 7).contiguous(memory_format=torch.channels_last_3d)
    padded = torch.cat([video[:, :, :1], video, video[:, :, -1:]], dim=2)  # replicate in time
    out = temporal_conv(video, conv)
    torch.testing.assert_close(out, conv(padded), rtol=1e-5, atol=1e-5)
    assert out.shape[2] == math.ceil(frames / stride)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    # Gradients reach the input and the Conv3d's own weights.
    out.square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_pixel_norm_is_rms_over_channels_and_local_to_each_pixel():
    norm = PixelRMSNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
        norm.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    x = torch.randn(2, 6, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, C, T, H, W)
    expected = x / x.square().mean(dim=1, keepdim=True).add(norm.eps).sqrt()
    expected = expected * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    # No statistic spans pixels: a crop is normalised exactly as inside the frame.
    torch.testing.assert_close(norm(x[..., 2:5, 1:7]), norm(x)[..., 2:5, 1:7])
    channels_last = x.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(norm(channels_last), expected)


def test_pixel_norm_gradients_match_autograd_of_the_plain_formula():
    generator = torch.Generator().manual_seed(1)
    # The fused backward against numerical derivatives (float64).
    x = torch.randn(12, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *args: _PixelRMSNormFunction.apply(*args, 1e-6), (x, weight, bias)
    )
    # The module on a channels-last video against F.rms_norm's autograd.
    norm = PixelRMSNorm(6)
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
        norm.bias.normal_(generator=generator)
    video = torch.randn(2, 6, 3, 4, 5, generator=generator)
    video = video.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    plain = F.rms_norm(video.permute(0, 2, 3, 4, 1), (6,), norm.weight, norm.eps)
    plain = (plain + norm.bias).permute(0, 4, 1, 2, 3)
    fused = norm(video)
    assert fused.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(fused, plain)
    upstream = torch.randn(fused.shape, generator=generator)
    params = (video, norm.weight, norm.bias)
    for got, want in zip(
        torch.autograd.grad(fused, params, upstream),
        torch.autograd.grad(plain, params, upstream),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="norm must be"):
        TAEConfig(norm="batch")
    with pytest.raises(ValueError, match="multiple of latent_channels"):
        TAEConfig(widths=(8, 8, 8, 24), norm_groups=4, residual_shortcuts=True)
    with pytest.raises(ValueError, match="4 levels"):
        TAEConfig(widths=(8, 8, 8))
    with pytest.raises(ValueError, match="norm_groups"):
        TAEConfig(widths=(8, 8, 12, 12), norm_groups=8)
    with pytest.raises(ValueError, match="unknown TAE recipe"):
        tae_recipe("huge")
    with pytest.raises(ValueError, match="temporal_compression must be"):
        TAEConfig(temporal_compression=3)


def test_latent_stats_accumulator_matches_torch():
    from moviegen.tae.stats import LatentStatsAccumulator

    latents = torch.randn(3, 16, 2, 4, 4) * torch.linspace(0.5, 3, 16).view(1, -1, 1, 1, 1) + 2
    accumulator = LatentStatsAccumulator(16)
    accumulator.update(latents[:1])
    accumulator.update(latents[1:])
    mean, std = accumulator.result()
    flat = latents.transpose(0, 1).flatten(1)
    torch.testing.assert_close(mean, flat.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, flat.std(1, correction=0), atol=1e-5, rtol=1e-5)


def test_batch_same_shape_groups_consecutive_clips_of_one_shape():
    from moviegen.tae.stats import batch_same_shape

    clips = [torch.full((1, 3, 8, 16, 16), float(i)) for i in range(5)]
    clips.insert(2, torch.zeros(1, 3, 4, 16, 16))  # another shape breaks the run
    batches = list(batch_same_shape(clips, batch_size=2))
    assert [tuple(batch.shape[:3]) for batch in batches] == [
        (2, 3, 8),
        (1, 3, 4),
        (2, 3, 8),
        (1, 3, 8),
    ]
    # Nothing lost, order kept.
    values = [float(clip[0, 0, 0, 0]) for batch in batches for clip in batch]
    assert values == [0.0, 1.0, 0.0, 2.0, 3.0, 4.0]
