"""Context parallel (CP) for the transformer: Ulysses sequence parallelism.

Each of the ``cp`` ranks of a CP group runs the same sample(s) but only a
contiguous slice of the video tokens through the blocks, which divides the
activations (the memory that grows with the clip length) by ``cp``:

- Before the blocks, :class:`ContextParallelSharding` pads the ``N`` tokens
  (and positions) to ``N' = cp * ceil(N / cp)``, masks the padded keys and
  keeps this rank's ``n = N' / cp`` tokens. Everything per-token (norms,
  modulation, FFN, cross-attention to the full, short text) needs nothing else.
- Self-attention is :class:`UlyssesAttention` (DeepSpeed-Ulysses): one
  all-to-all turns sequence-sharded ``q, k, v`` ``(B, H, n, hd)`` into
  head-sharded ``(B, H / cp, N', hd)``, each rank runs ordinary SDPA over
  the whole sequence for its heads, and a second all-to-all turns the output
  back. Hence ``num_heads`` must be a multiple of ``cp``.
- After the final layer the outputs are all-gathered and the padding dropped,
  so the model's output is the full velocity on every CP rank.

Gradients: the loss computed from the (replicated) output is the same on all
CP ranks, and each rank's backward only reaches its own tokens: every
parameter gradient on a rank is that rank's *partial* sum over its tokens.
The gradient of the loss is their **sum** over the CP group, not their mean:
FSDP2 over a mesh that folds in the CP axis averages over all its ranks, so
divide by the data-parallel degree only (``set_gradient_divide_factor``) or
scale the loss by ``cp``.

The model itself knows nothing of this: :func:`apply_context_parallel` swaps
its two hooks (``MovieGenTransformer.sequence_sharding`` and each block's
``self_attn.attention_fn``). Apply it before activation checkpointing,
``torch.compile`` and FSDP2.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from moviegen.transformer.model import MovieGenTransformer, SequenceSharding

__all__ = [
    "ContextParallelSharding",
    "UlyssesAttention",
    "all_to_all",
    "apply_context_parallel",
    "context_parallel_group",
]

# Axes of attention's (B, H, N, hd) tensors that Ulysses swaps between sharded and whole.
_HEAD_AXIS = 1
_SEQUENCE_AXIS = 2
# Token axis of the model's (B, N, D) token tensors.
_TOKEN_AXIS = 1


def context_parallel_group(mesh_or_group: DeviceMesh | ProcessGroup) -> ProcessGroup:
    """The process group of a 1-D device mesh, or the group itself."""
    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim != 1:
            raise ValueError(
                f"context parallel needs a 1-D device mesh, got {mesh_or_group.ndim} dims "
                f"{mesh_or_group.mesh_dim_names}; pass its CP axis, e.g. mesh['cp']"
            )
        return mesh_or_group.get_group()
    if isinstance(mesh_or_group, ProcessGroup):
        return mesh_or_group
    raise TypeError(
        f"expected a 1-D DeviceMesh or a ProcessGroup, got {type(mesh_or_group).__name__}"
    )


# ----------------------------------------------------------------------------- collectives


def _all_to_all(
    x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup
) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` into ``cp`` chunks, send chunk ``r`` to
    rank ``r``, and concatenate what arrives along ``gather_dim`` in rank order."""
    degree = dist.get_world_size(group)
    send = torch.stack(x.chunk(degree, dim=scatter_dim))  # (cp, ...chunk)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Differentiable :func:`_all_to_all`: the backward is the reverse all-to-all."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup
    ) -> torch.Tensor:
        ctx.dims = (scatter_dim, gather_dim)
        ctx.group = group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup
) -> torch.Tensor:
    """Differentiable all-to-all: shard ``scatter_dim``, un-shard ``gather_dim``.

    ``x``'s ``scatter_dim`` must be a multiple of the group size ``cp``; the
    result has ``scatter_dim`` divided and ``gather_dim`` multiplied by ``cp``,
    e.g. ``(B, H, N / cp, hd)`` -> ``(B, H / cp, N, hd)`` for ``(1, 2)``.
    """
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


class _GatherTokens(torch.autograd.Function):
    """All-gather of ``(B, n, X)`` slices into ``(B, cp * n, X)`` on every rank.

    The output is replicated and so is the loss computed from it, so a rank's
    gradient for its slice is the slice of its own output gradient (no sum over
    ranks, unlike ``torch.distributed.nn.functional.all_gather``).
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        local = local.contiguous()
        slices = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(slices, local, group=group)
        return torch.cat(slices, dim=_TOKEN_AXIS)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        slices = grad.chunk(dist.get_world_size(ctx.group), dim=_TOKEN_AXIS)
        return slices[dist.get_rank(ctx.group)].contiguous(), None


# ----------------------------------------------------------------------------- the hooks


class UlyssesAttention:
    """Self-attention over the whole sequence from sequence-sharded heads.

    An :data:`~moviegen.transformer.blocks.AttentionFn`: ``q, k, v``
    ``(B, H, n, hd)`` are this rank's contiguous slice of the ``N' = cp * n``
    tokens; ``attn_mask`` is the bool key mask ``(B, 1, 1, N')`` of the whole
    sequence (True = attend) or None. Returns ``(B, H, n, hd)``, exactly
    ``SDPA(q, k, v)`` of the whole sequence restricted to the local queries.
    """

    def __init__(self, group: ProcessGroup):
        self.group = group

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        degree = dist.get_world_size(self.group)
        if q.shape[_HEAD_AXIS] % degree:
            raise ValueError(
                f"{q.shape[_HEAD_AXIS]} attention heads cannot be split over "
                f"{degree} context-parallel ranks"
            )
        if attn_mask is not None and attn_mask.shape[_HEAD_AXIS] != 1:
            raise ValueError(
                "context-parallel attention needs a key mask shared by all heads, "
                f"(B, 1, 1, N), got {tuple(attn_mask.shape)}"
            )
        # One collective for q, k and v instead of three; stacking shifts the axes by one.
        qkv = torch.stack((q, k, v))  # (3, B, H, n, hd)
        qkv = all_to_all(qkv, _HEAD_AXIS + 1, _SEQUENCE_AXIS + 1, self.group)
        q, k, v = qkv.unbind(0)  # each (B, H / cp, N', hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H / cp, N', hd)
        return all_to_all(out, _SEQUENCE_AXIS, _HEAD_AXIS, self.group)  # (B, H, n, hd)

    def __deepcopy__(self, memo: dict) -> UlyssesAttention:
        # A copied model (e.g. an EMA shadow) runs on the same group; process
        # groups cannot be copied.
        return self


class ContextParallelSharding(SequenceSharding):
    """Keep this rank's contiguous slice of the (padded) tokens; gather the outputs.

    Rank ``r`` of ``cp`` holds tokens ``[r * n, (r + 1) * n)`` of the sequence
    padded to ``N' = cp * n``, ``n = ceil(N / cp)``. Padded tokens are zeros
    and are masked as keys, so they change no real token's output; their own
    outputs are dropped by :meth:`gather`.
    """

    def __init__(self, group: ProcessGroup):
        self.group = group

    def shard(
        self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(B, N, D)``, ``(N, D)``, ``(B, N)`` or None -> ``(B, n, D)``, ``(n, D)``,
        ``(B, N')`` or None (None only when nothing was padded)."""
        degree = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        batch, num_tokens = tokens.shape[:2]
        num_local = math.ceil(num_tokens / degree)
        num_padding = degree * num_local - num_tokens
        if num_padding:
            tokens = F.pad(tokens, (0, 0, 0, num_padding))  # (B, N', D)
            positions = F.pad(positions, (0, 0, 0, num_padding))  # (N', D)
            if keys is None:
                keys = torch.ones(batch, num_tokens, dtype=torch.bool, device=tokens.device)
            keys = F.pad(keys, (0, num_padding), value=False)  # (B, N')
        # Plain slicing: its backward puts zeros at the other ranks' tokens,
        # which is right because their gradients arrive on those ranks.
        local = slice(rank * num_local, (rank + 1) * num_local)
        return tokens[:, local], positions[local], keys

    def gather(self, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """``(B, n, X)`` local outputs -> ``(B, num_tokens, X)`` on every rank."""
        gathered = _GatherTokens.apply(tokens, self.group)  # (B, N', X)
        return gathered[:, :num_tokens]

    def __deepcopy__(self, memo: dict) -> ContextParallelSharding:
        return self  # as UlyssesAttention.__deepcopy__


def apply_context_parallel(
    model: MovieGenTransformer, mesh_or_group: DeviceMesh | ProcessGroup
) -> None:
    """Make ``model`` run context parallel over ``mesh_or_group``, in place.

    Installs :class:`ContextParallelSharding` and, in every block's
    self-attention, :class:`UlyssesAttention`; cross-attention is unchanged.
    The CP degree is the group's size; degree 1 leaves the model untouched.
    Every rank of the group must then call the model with the same inputs,
    and gets the same full output; see the module docstring for gradients.

    Args:
        model: the transformer (on any device, ``meta`` included), before
            activation checkpointing, ``torch.compile`` and FSDP2.
        mesh_or_group: a 1-D :class:`DeviceMesh` (e.g. ``mesh["cp"]``) or a
            :class:`ProcessGroup`.

    Raises:
        TypeError: ``model`` or ``mesh_or_group`` is of the wrong type.
        ValueError: a mesh with more than one dim, or ``num_heads`` not a
            multiple of the degree.
    """
    if not isinstance(model, MovieGenTransformer):
        raise TypeError(f"model must be a MovieGenTransformer, got {type(model).__name__}")
    group = context_parallel_group(mesh_or_group)
    degree = dist.get_world_size(group)
    if degree == 1:
        return
    num_heads = model.config.num_heads
    if num_heads % degree:
        raise ValueError(
            f"context parallel (Ulysses) splits the attention heads over the ranks: "
            f"num_heads ({num_heads}) must be a multiple of the context-parallel degree "
            f"({degree}); choose a degree that divides {num_heads}"
        )
    model.sequence_sharding = ContextParallelSharding(group)
    for block in model.blocks:
        block.self_attn.attention_fn = UlyssesAttention(group)
