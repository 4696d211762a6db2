"""Tiled TAE decoding: overlapping tiles blended linearly, at flat memory.

Movie Gen decodes long videos in temporal tiles of 32 frames (4 latent frames)
that overlap by 16 frames (2 latent frames); in each overlap the two tiles are
cross-faded with linear weights, which hides the seams a hard cut would show.
Encoding needs no overlap: the TAE encoder already works on independent
32-frame chunks (see :mod:`moviegen.tae.model`).

Large frames can also be tiled spatially (``spatial_tile_latents``), with the
same linear cross-fade along height and width.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

__all__ = ["blend_weights", "decode_tiled", "should_tile", "tile_starts"]

# Pixels per latent along height and width (and, by default, frames per latent frame).
COMPRESSION = 8


def should_tile(length: int, tile: int) -> bool:
    """Tile only when the input is longer than one tile."""
    return length > tile


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``[0, length)``.

    Consecutive tiles overlap by at least ``overlap``; the last tile is shifted
    back to end exactly at ``length`` (so it may overlap its neighbour more).
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > overlap >= 0, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def blend_weights(spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per-tile 1D weights over each tile's span ``[begin, end)``.

    Inside the overlap with the previous tile the weight ramps up linearly,
    inside the overlap with the next tile it ramps down; elsewhere it is 1.
    Ramps are sampled at element centres so both tiles of an overlap get
    non-zero weight and the two ramps sum to one.
    """
    weights = []
    for index, (begin, end) in enumerate(spans):
        positions = torch.arange(begin, end, dtype=torch.float64) + 0.5
        weight = torch.ones(end - begin, dtype=torch.float64)
        if index > 0:
            previous_end = spans[index - 1][1]
            if previous_end > begin:
                ramp = (positions - begin) / (previous_end - begin)
                weight = torch.minimum(weight, ramp.clamp(max=1))
        if index < len(spans) - 1:
            next_begin = spans[index + 1][0]
            if end > next_begin:
                ramp = (end - positions) / (end - next_begin)
                weight = torch.minimum(weight, ramp.clamp(max=1))
        weights.append(weight)
    return weights


def decode_tiled(
    decode: Callable[[torch.Tensor, int], torch.Tensor],
    latents: torch.Tensor,
    *,
    num_frames: int,
    tile_latent_frames: int = 4,
    overlap_latent_frames: int = 2,
    spatial_tile_latents: int | None = None,
    spatial_overlap_latents: int = 4,
    temporal_compression: int = COMPRESSION,
) -> torch.Tensor:
    """Decode raw latents ``(B, C, T', H', W')`` tile by tile.

    Args:
        decode: ``decode(latent_tile, num_frames) -> video tile`` (the TAE's
            :meth:`~moviegen.tae.model.TAE.decode_latents`).
        latents: raw (un-normalised) latents.
        num_frames: frames of the full output; ``ceil(num_frames / temporal_compression) == T'``.
        tile_latent_frames, overlap_latent_frames: temporal tile and overlap.
        spatial_tile_latents: also tile height and width in tiles of this many
            latents (``None``: whole frames).
        spatial_overlap_latents: spatial overlap in latents.
        temporal_compression: frames per latent frame of the TAE.

    Returns:
        Video ``(B, 3, num_frames, 8 H', 8 W')`` in float32.
    """
    batch, _, latent_frames, latent_height, latent_width = latents.shape
    needed = -(-num_frames // temporal_compression)
    if needed != latent_frames:
        raise ValueError(f"{num_frames} frames need {needed} latent frames, got {latent_frames}")
    height, width = latent_height * COMPRESSION, latent_width * COMPRESSION

    def axis_tiles(length: int, tile: int, overlap: int, pixel_limit: int, factor: int):
        starts = tile_starts(length, tile, overlap)
        latent_spans = [(start, min(start + tile, length)) for start in starts]
        pixel_spans = [
            (begin * factor, min(end * factor, pixel_limit)) for begin, end in latent_spans
        ]
        return latent_spans, pixel_spans, blend_weights(pixel_spans)

    time_tiles = axis_tiles(
        latent_frames, tile_latent_frames, overlap_latent_frames, num_frames, temporal_compression
    )
    if spatial_tile_latents is None:
        height_tiles = (
            [(0, latent_height)],
            [(0, height)],
            [torch.ones(height, dtype=torch.float64)],
        )
        width_tiles = ([(0, latent_width)], [(0, width)], [torch.ones(width, dtype=torch.float64)])
    else:
        height_tiles = axis_tiles(
            latent_height, spatial_tile_latents, spatial_overlap_latents, height, COMPRESSION
        )
        width_tiles = axis_tiles(
            latent_width, spatial_tile_latents, spatial_overlap_latents, width, COMPRESSION
        )

    output = torch.zeros(batch, 3, num_frames, height, width, device=latents.device)
    total_weight = torch.zeros(num_frames, height, width, device=latents.device)
    for (t_lat, t_pix, t_w), (h_lat, h_pix, h_w), (w_lat, w_pix, w_w) in itertools.product(
        zip(*time_tiles, strict=True),
        zip(*height_tiles, strict=True),
        zip(*width_tiles, strict=True),
    ):
        piece = latents[:, :, slice(*t_lat), slice(*h_lat), slice(*w_lat)]
        video = decode(piece, t_pix[1] - t_pix[0]).float()
        weight = (t_w[:, None, None] * h_w[None, :, None] * w_w[None, None, :]).to(output)
        region = (slice(*t_pix), slice(*h_pix), slice(*w_pix))
        output[(slice(None), slice(None), *region)] += video * weight
        total_weight[region] += weight
    # In place: a second full-length video here would be the largest allocation.
    return output.div_(total_weight)
