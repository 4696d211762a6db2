"""The Movie Gen transformer: noisy latent + timestep + text -> velocity.

``(B, C, T, H, W)`` latent -> Conv3d patchify (kernel = stride = patch) ->
``(B, N, D)`` tokens in ``(t, h, w)`` order -> ``num_layers`` blocks, each fed
its input plus the factorised position embedding -> modulated RMSNorm + Linear
-> unpatchify -> velocity ``(B, C, T, H, W)`` (MOVIEGEN.md section 2).

Timestep conditioning is adaLN-single (PixArt-alpha): sinusoidal features of
``1000 t`` -> MLP -> embedding ``e`` ``(B, D)`` -> ``Linear(SiLU(e))`` ``(B, 6 D)``,
computed once and shared by every block, which adds its own ``(6, D)`` table.
A per-block ``Linear(D, 6 D)`` would cost 10.9B parameters at 30B scale.
With ``pooled_text`` (off in the paper's recipes) an MLP of the mean text
token is added to ``e`` first, so the caption also sets the modulation.

Masks (True = real):

- ``context_mask`` ``(B, L)`` masks padded text *keys* in cross-attention. A
  sample whose mask is all False (a dropped caption) gets a cross-attention
  output of exactly zero in every block, as attention over an empty set of
  keys should be; its attention is computed over all keys only to stay finite
  (softmax over nothing is NaN) and then discarded, with no host sync.
- ``video_mask`` ``(B, T, H, W)`` on the latent grid; a token is real when all
  latent positions of its patch are. Padded tokens are masked as *keys* in
  self-attention, so they cannot change real tokens' outputs; their own
  outputs are meaningless and must be masked in the loss. A sample with no
  real token at all attends to all of its (padding) tokens, which is finite
  and equally meaningless.

The module knows nothing about parallelism. Build it on the ``meta`` device,
shard it, ``to_empty()`` it and call :meth:`MovieGenTransformer.init_weights`.
Context parallel plugs in from outside through two hooks, both no-ops here:
:attr:`MovieGenTransformer.sequence_sharding` (a :class:`SequenceSharding`:
which video tokens this device computes) and each self-attention's
``attention_fn`` (:class:`~moviegen.transformer.blocks.Attention`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moviegen.transformer.blocks import NUM_MODULATIONS, TransformerBlock, modulate
from moviegen.transformer.config import TransformerConfig
from moviegen.transformer.embeddings import (
    PatchEmbed,
    PooledTextEmbed,
    PositionEmbed,
    TimestepEmbed,
)

__all__ = ["COND_KEYS", "MovieGenTransformer", "SequenceSharding"]

# Keys of the ``cond`` dict of :meth:`MovieGenTransformer.velocity` (True = required).
COND_KEYS = {"context": True, "context_mask": True, "video_mask": False}
# Final modulation table: shift and scale.
NUM_FINAL_MODULATIONS = 2


class SequenceSharding:
    """Which video tokens this device runs through the blocks: all of them.

    The hook for context parallel (``moviegen.distributed.context_parallel``
    subclasses it). Between :meth:`shard` and :meth:`gather` every block and
    the final layer see only the local tokens; self-attention's keys must be
    the whole sequence, which is the installed ``attention_fn``'s job.
    """

    def shard(
        self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Local tokens, their positions and the key mask of the whole sequence.

        Args:
            tokens: ``(B, N, D)`` all video tokens.
            positions: ``(N, D)`` their position embedding.
            keys: ``(B, N)`` bool, True = real video key, or None (all real).

        Returns:
            ``(B, n, D)`` local tokens, ``(n, D)`` their positions and the
            ``(B, N')`` key mask of the (possibly padded, ``N' >= N``) whole
            sequence, or None. Here ``n = N' = N`` and nothing changes.
        """
        return tokens, positions, keys

    def gather(self, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Local outputs ``(B, n, X)`` -> outputs ``(B, num_tokens, X)`` of all tokens."""
        return tokens


class FinalLayer(nn.Module):
    """Modulated RMSNorm + Linear: tokens ``(B, N, D)`` -> patches ``(B, N, patch * C)``.

    Shift and scale are the timestep embedding plus a learned ``(2, D)`` table
    (PixArt-alpha's final layer: no extra projection).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps, elementwise_affine=False)
        self.modulation = nn.Parameter(torch.empty(NUM_FINAL_MODULATIONS, config.dim))
        self.proj = nn.Linear(config.dim, config.patch_volume * config.latent_channels)
        self.dim = config.dim

    def init_weights(self) -> None:
        # Small random offsets (as PixArt-alpha); the zero projection makes
        # the untrained model predict a velocity of exactly zero.
        nn.init.normal_(self.modulation, std=self.dim**-0.5)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D), embedding: (B, D)
        shift, scale = (self.modulation + embedding[:, None]).unsqueeze(2).unbind(1)  # (B, 1, D)
        return self.proj(modulate(self.norm(x), shift, scale))  # (B, N, patch * C)


class MovieGenTransformer(nn.Module):
    """The Movie Gen Video backbone (single-device code).

    ``forward(x, t, context, context_mask, video_mask=None)`` -> velocity with
    ``x``'s shape; ``velocity(x, t, cond)`` is the same with the conditioning
    in a dict, the signature solvers and CFG wrappers use.
    """

    # The repeated blocks (``self.blocks``), the unit of FSDP wrapping,
    # activation checkpointing and per-block compilation.
    block_class: ClassVar[type[nn.Module]] = TransformerBlock
    # Submodules best kept in fp32 under mixed precision: their output sets the
    # scale and gate of every block, and bf16 rounding there shifts all of them.
    fp32_modules: ClassVar[tuple[str, ...]] = (
        "timestep_embed",
        "text_pool",
        "timestep_modulation",
    )

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.position_embed = PositionEmbed(config)
        self.timestep_embed = TimestepEmbed(config)
        # Optional global text conditioning, added to the timestep embedding.
        self.text_pool = PooledTextEmbed(config) if config.pooled_text else None
        # adaLN-single: the one timestep -> (shift, scale, gate) x 2 projection.
        self.timestep_modulation = nn.Linear(config.dim, NUM_MODULATIONS * config.dim)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.final_layer = FinalLayer(config)
        # Context parallel replaces this (and self-attention's attention_fn).
        self.sequence_sharding = SequenceSharding()
        self.init_weights()

    # --------------------------------------------------------------- init

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter; the untrained model outputs zero.

        Zero: the shared modulation projection, every block's modulation table
        (so all gates are 0 and all blocks the identity), the cross-attention
        output projections, the final projection and the pooled-text MLP's
        output layer. Truncated normal (std 0.02, depth-scaled for residual
        outputs) for the other block linears, normal for the timestep and
        pooled-text MLPs' other layers, sinusoids (or normal, see
        ``position_init``) for the position tables, Xavier for the patch
        embedding. Safe after ``to_empty()`` on a model built on ``meta``.
        """
        self.patch_embed.init_weights()
        self.position_embed.init_weights()
        self.timestep_embed.init_weights()
        if self.text_pool is not None:
            self.text_pool.init_weights()
        nn.init.zeros_(self.timestep_modulation.weight)
        nn.init.zeros_(self.timestep_modulation.bias)
        for block in self.blocks:
            block.init_weights()
        self.final_layer.init_weights()

    # --------------------------------------------------------------- pieces

    def token_grid(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(Tp, Hp, Wp)`` tokens of a latent ``(T, H, W)``."""
        return tuple(
            size // patch for size, patch in zip(latent_shape, self.config.patch_size, strict=True)
        )

    def patch_mask(self, video_mask: torch.Tensor) -> torch.Tensor:
        """Latent-grid mask ``(B, T, H, W)`` -> token mask ``(B, N)``: a token is
        real when every latent position of its patch is."""
        pt, ph, pw = self.config.patch_size
        patches = rearrange(
            video_mask, "b (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw)", pt=pt, ph=ph, pw=pw
        )
        return patches.all(dim=-1)  # (B, N)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``(B, N, pt * ph * pw * C)`` -> ``(B, C, Tp * pt, Hp * ph, Wp * pw)``."""
        pt, ph, pw = self.config.patch_size
        num_t, num_h, num_w = grid
        return rearrange(
            patches,
            "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
            t=num_t,
            h=num_h,
            w=num_w,
            pt=pt,
            ph=ph,
            pw=pw,
        )

    # --------------------------------------------------------------- checks

    def _check_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        video_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Validate shapes (no host sync); returns ``t`` as ``(B,)``."""
        config = self.config
        for name, value in (
            ("x", x),
            ("t", t),
            ("context", context),
            ("context_mask", context_mask),
        ):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        if x.ndim != 5:
            raise ValueError(
                f"x must be a latent (B, C, T, H, W), got shape {tuple(x.shape)}; "
                "images are 1-frame videos (T = 1)"
            )
        batch, channels, frames, height, width = x.shape
        if channels != config.latent_channels:
            raise ValueError(
                f"x has {channels} channels, the transformer expects {config.latent_channels} "
                "(channels come second: (B, C, T, H, W))"
            )
        if 0 in x.shape:
            raise ValueError(f"x is empty: shape {tuple(x.shape)}")
        for axis, size, patch, limit, field in zip(
            ("frames", "height", "width"),
            (frames, height, width),
            config.patch_size,
            config.max_latent_sizes,
            ("max_latent_frames", "max_latent_height", "max_latent_width"),
            strict=True,
        ):
            if size % patch:
                raise ValueError(
                    f"latent {axis} {size} is not a multiple of the patch size {patch}; "
                    f"pad the latent (and mark the padding False in video_mask)"
                )
            if size > limit:
                raise ValueError(
                    f"latent {axis} {size} is more than the position tables cover "
                    f"({field}={limit}, latent units); use a recipe with larger tables "
                    "or a smaller input"
                )
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape (B,) = ({batch},), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"t must be a float tensor in [0, 1], got {t.dtype}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != config.dim:
            raise ValueError(
                f"context must be (B, L, dim) = ({batch}, L, {config.dim}) (already projected "
                f"to the model width), got {tuple(context.shape)}"
            )
        if context.shape[1] == 0:
            raise ValueError("context has no tokens (L = 0); pad it to L >= 1 with mask False")
        if context_mask.shape != context.shape[:2]:
            raise ValueError(
                f"context_mask must be (B, L) = {tuple(context.shape[:2])}, "
                f"got {tuple(context_mask.shape)}"
            )
        if context_mask.dtype != torch.bool:
            raise TypeError(
                f"context_mask must be bool (True = real token), got {context_mask.dtype}"
            )
        if video_mask is not None:
            if not isinstance(video_mask, torch.Tensor):
                raise TypeError(f"video_mask must be a tensor, got {type(video_mask).__name__}")
            if video_mask.shape != (batch, frames, height, width):
                raise ValueError(
                    f"video_mask must be (B, T, H, W) = {(batch, frames, height, width)} on the "
                    f"latent grid, got {tuple(video_mask.shape)}"
                )
            if video_mask.dtype != torch.bool:
                raise TypeError(f"video_mask must be bool (True = real), got {video_mask.dtype}")
        return t

    # --------------------------------------------------------------- forward

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        video_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        Args:
            x: noisy latent ``(B, C, T, H, W)``; T, H, W multiples of the patch
                size and within the position tables.
            t: time ``(B,)`` in ``[0, 1]`` (0 = noise, 1 = data); a 0-d tensor
                is broadcast to the batch.
            context: text tokens ``(B, L, dim)``, already projected to the model width.
            context_mask: ``(B, L)`` bool, True = real text token.
            video_mask: ``(B, T, H, W)`` bool on the latent grid, True = real
                position, or None when nothing is padded.

        Returns:
            velocity ``(B, C, T, H, W)``.
        """
        t = self._check_inputs(x, t, context, context_mask, video_mask)
        grid = self.token_grid(x.shape[2:])

        tokens = self.patch_embed(x)  # (B, N, D)
        positions = self.position_embed(grid).to(tokens.dtype)  # (N, D)

        embedding = self.timestep_embed(t)  # (B, D)
        if self.text_pool is not None:
            embedding = embedding + self.text_pool(context, context_mask)  # (B, D)
        modulation = self.timestep_modulation(F.silu(embedding))  # (B, 6 D)
        modulation = modulation.unflatten(1, (NUM_MODULATIONS, self.config.dim))  # (B, 6, D)

        keys = None
        if video_mask is not None:
            keys = self.patch_mask(video_mask)  # (B, N)
            # A sample without real tokens attends to all of them (finite, unused).
            keys = keys | ~keys.any(dim=1, keepdim=True)
        num_tokens = tokens.shape[1]
        # From here to the gather, only this device's n tokens (n = N without
        # context parallel); the key mask covers the whole (maybe padded) sequence.
        tokens, positions, keys = self.sequence_sharding.shard(tokens, positions, keys)
        self_mask = None if keys is None else keys[:, None, None, :]  # (B, 1, 1, N)
        has_context = context_mask.any(dim=1)  # (B,)
        # Samples without text attend to everything, then have the result zeroed.
        cross_mask = (context_mask | ~has_context[:, None])[:, None, None, :]  # (B, 1, 1, L)
        has_context = has_context.to(tokens.dtype)[:, None, None]  # (B, 1, 1)

        for block in self.blocks:
            tokens = block(
                tokens + positions, modulation, context, self_mask, cross_mask, has_context
            )

        patches = self.final_layer(tokens, embedding)  # (B, n, patch * C)
        # Gathered after the final layer: its output is narrower than D (less to
        # send), and so every parameter sees only the local tokens.
        patches = self.sequence_sharding.gather(patches, num_tokens)  # (B, N, patch * C)
        return self.unpatchify(patches, grid)  # (B, C, T, H, W)

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``forward`` with ``cond = {"context", "context_mask"[, "video_mask"]}``.

        Unknown keys are an error rather than silently ignored.
        """
        missing = [key for key, required in COND_KEYS.items() if required and key not in cond]
        unknown = sorted(set(cond) - set(COND_KEYS))
        if missing or unknown:
            raise ValueError(
                f"cond must have keys {[k for k, r in COND_KEYS.items() if r]} and optionally "
                f"'video_mask'; missing {missing}, unknown {unknown}"
            )
        return self(x, t, cond["context"], cond["context_mask"], cond.get("video_mask"))
