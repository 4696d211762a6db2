"""How the GPUs of a job are split, and the device mesh that names the split.

A job of ``world_size`` ranks is a ``(dp_replicate, dp_shard, cp)`` grid
(:data:`MESH_AXES`, outermost first, so the ranks of one context-parallel group
are neighbours, i.e. on one node):

- ``dp_shard``: FSDP2 shards parameters, gradients and optimizer state over
  this axis; each rank reads different samples.
- ``dp_replicate``: HSDP. Every replica holds a full set of shards; gradients
  are all-reduced between replicas. Each replica reads different samples.
- ``cp``: context parallel. The ranks of one ``cp`` group split one sample's
  video tokens and read the *same* samples; their gradients still have to be
  summed, so FSDP runs over them too: as replicas (``shard_across_cp=False``,
  the planner's default) or as more shards (``shard_across_cp=True``,
  torchtitan's choice: less memory, larger collectives).

Data sharding and per-rank randomness (noise, timesteps, caption dropout) go by
the *data-parallel* rank (:func:`data_parallel_rank`), not the global rank:
the ``cp`` ranks of one sample must draw the same noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "AC_MODES",
    "CP_AXIS",
    "DP_REPLICATE_AXIS",
    "DP_SHARD_AXIS",
    "MESH_AXES",
    "PARAM_DTYPES",
    "ParallelConfig",
    "build_mesh",
    "cp_mesh",
    "data_parallel_rank",
    "data_parallel_size",
    "fsdp_mesh",
]

DP_REPLICATE_AXIS = "dp_replicate"
DP_SHARD_AXIS = "dp_shard"
CP_AXIS = "cp"
# Outermost first: neighbouring ranks differ in cp, then in dp_shard.
MESH_AXES = (DP_REPLICATE_AXIS, DP_SHARD_AXIS, CP_AXIS)
# Names of the flattened axes FSDP runs over when cp is folded into one of them.
_SHARD_CP_AXIS = "dp_shard_cp"
_REPLICATE_CP_AXIS = "dp_replicate_cp"
# A dp_shard degree of -1 means: whatever the world size leaves after the others.
INFER_DEGREE = -1

AC_MODES = ("none", "full", "selective")
# Selective AC by operator instead of by block (see ParallelConfig.selective_ac_option).
SELECTIVE_OP = "op"
# Mixed-precision names accepted in configs; "auto" is resolved per device type.
PARAM_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
REDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Device types where "auto" means bf16 compute: the tensor-core GPUs. Elsewhere
# (the CPU tests, the planner's fp32 reference) "auto" keeps fp32.
_BF16_DEVICE_TYPES = ("cuda",)


def _check_degree(name: str, value: object, *, allow_infer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < 1 and not (allow_infer and value == INFER_DEGREE):
        hint = f" (or {INFER_DEGREE} to infer it from the world size)" if allow_infer else ""
        raise ValueError(f"{name} must be >= 1{hint}, got {value}")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the transformer is parallelised and what it computes in.

    The defaults are plain FSDP2 over every rank, no activation
    checkpointing, no compile, bf16 compute on CUDA and fp32 elsewhere.
    """

    #: Ranks FSDP2 shards over; -1: ``world_size / (dp_replicate * cp)``.
    dp_shard: int = INFER_DEGREE
    #: HSDP replicas (each a full set of shards; gradients all-reduced between them); 1: FSDP.
    dp_replicate: int = 1
    #: Ranks that split one sample's video tokens (``context_parallel.apply_context_parallel``).
    context_parallel_degree: int = 1
    #: With cp > 1: shard states over ``dp_shard x cp`` (True, as torchtitan) or keep the
    #: cp ranks as replicas of the ``dp_shard`` shards (False, the planner's default).
    shard_across_cp: bool = False
    #: Activation checkpointing of the transformer blocks: ``none``, ``full`` (every block
    #: keeps only its input) or ``selective`` (see ``selective_ac_option``).
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    #: For ``selective``: an int k checkpoints every k-th block (blocks 0, k, 2k, ...;
    #: k = 1 is ``full``); ``"op"`` checkpoints every block but keeps the outputs of its
    #: matmuls and attention kernels, recomputing only the cheap elementwise work
    #: (what the planner's ``selective`` mode models).
    selective_ac_option: int | Literal["op"] = 2
    #: ``torch.compile`` each transformer block in place (parameter names unchanged).
    compile: bool = False
    #: Dtype the blocks compute and all-gather in: ``auto`` (bf16 on CUDA, fp32
    #: elsewhere), ``bfloat16`` or ``float32``. Sharded weights and optimizer state stay fp32.
    param_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    #: Dtype of the gradient reduce-scatter / all-reduce (fp32: sums of many ranks stay exact).
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        _check_degree("dp_shard", self.dp_shard, allow_infer=True)
        _check_degree("dp_replicate", self.dp_replicate)
        _check_degree("context_parallel_degree", self.context_parallel_degree)
        if self.activation_checkpointing not in AC_MODES:
            raise ValueError(
                f"activation_checkpointing must be one of {', '.join(AC_MODES)}, "
                f"got {self.activation_checkpointing!r}"
            )
        option = self.selective_ac_option
        if option != SELECTIVE_OP and (
            isinstance(option, bool) or not isinstance(option, int) or option < 1
        ):
            raise ValueError(
                f"selective_ac_option must be a positive int k (checkpoint every k-th block) "
                f"or {SELECTIVE_OP!r} (per-operator), got {option!r}"
            )
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(
                f"param_dtype must be one of {', '.join(PARAM_DTYPES)}, got {self.param_dtype!r}"
            )
        if self.reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(
                f"reduce_dtype must be one of {', '.join(REDUCE_DTYPES)}, got {self.reduce_dtype!r}"
            )
        for name in ("shard_across_cp", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def degrees(self) -> tuple[int, int, int]:
        """``(dp_replicate, dp_shard, cp)``, the sizes of :data:`MESH_AXES`."""
        return (self.dp_replicate, self.dp_shard, self.context_parallel_degree)

    def resolve(self, world_size: int) -> ParallelConfig:
        """This config with ``dp_shard`` inferred; ``ValueError`` unless the degrees
        multiply to ``world_size``."""
        _check_degree("world_size", world_size)
        others = self.dp_replicate * self.context_parallel_degree
        if self.dp_shard == INFER_DEGREE:
            if world_size % others:
                raise ValueError(
                    f"world size {world_size} is not divisible by dp_replicate "
                    f"({self.dp_replicate}) x context_parallel_degree "
                    f"({self.context_parallel_degree}) = {others}, so dp_shard cannot be inferred"
                )
            return replace(self, dp_shard=world_size // others)
        if math.prod(self.degrees) != world_size:
            raise ValueError(
                f"dp_replicate ({self.dp_replicate}) x dp_shard ({self.dp_shard}) x "
                f"context_parallel_degree ({self.context_parallel_degree}) = "
                f"{math.prod(self.degrees)}, but the world size is {world_size}; "
                f"set dp_shard={INFER_DEGREE} to infer it"
            )
        return self

    def compute_dtype(self, device_type: str) -> torch.dtype:
        """The blocks' compute (and all-gather) dtype on ``device_type``."""
        dtype = PARAM_DTYPES[self.param_dtype]
        if dtype is None:
            return torch.bfloat16 if device_type in _BF16_DEVICE_TYPES else torch.float32
        return dtype

    @property
    def gradient_reduce_dtype(self) -> torch.dtype:
        return REDUCE_DTYPES[self.reduce_dtype]


def build_mesh(config: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh:
    """The ``(dp_replicate, dp_shard, cp)`` :class:`~torch.distributed.device_mesh.DeviceMesh`.

    Needs an initialised default process group of ``world_size`` ranks (and, on
    CUDA, ``torch.cuda.set_device(local_rank)`` first). Every axis is present,
    size-1 ones included, so code can always ask for ``mesh["cp"]``.

    Raises:
        ValueError: the degrees do not multiply to ``world_size``.
        RuntimeError: no process group, or one of another size.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    resolved = config.resolve(world_size)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "build_mesh needs torch.distributed initialised first "
            "(torchrun, then dist.init_process_group)"
        )
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"world_size={world_size} was given but the process group has "
            f"{dist.get_world_size()} ranks"
        )
    return init_device_mesh(device_type, resolved.degrees, mesh_dim_names=MESH_AXES)


def _check_mesh(mesh: DeviceMesh) -> None:
    if mesh.mesh_dim_names != MESH_AXES:
        raise ValueError(
            f"expected a mesh with axes {MESH_AXES} (from build_mesh), got {mesh.mesh_dim_names}"
        )


def data_parallel_size(mesh: DeviceMesh) -> int:
    """Ranks that read different samples: ``dp_replicate * dp_shard`` (cp ranks share)."""
    _check_mesh(mesh)
    return mesh.size(0) * mesh.size(1)


def data_parallel_rank(mesh: DeviceMesh) -> int:
    """This rank's index among the :func:`data_parallel_size` sample readers.

    Use it to pick the data shard and to seed per-rank noise: the ``cp`` ranks
    of one sample get the same value.
    """
    _check_mesh(mesh)
    replica = mesh.get_local_rank(DP_REPLICATE_AXIS)
    shard = mesh.get_local_rank(DP_SHARD_AXIS)
    return replica * mesh.size(1) + shard


def cp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1D ``cp`` sub-mesh: the ranks that split this rank's samples' tokens."""
    _check_mesh(mesh)
    return mesh[CP_AXIS]


def fsdp_mesh(mesh: DeviceMesh, config: ParallelConfig) -> DeviceMesh:
    """The mesh FSDP2 runs over: 1D ``(shard,)`` or, with replicas, 2D ``(replicate, shard)``.

    The cp axis is folded into the shard axis (``shard_across_cp``) or the
    replicate axis; axes of size 1 are left out, so plain FSDP gets a 1D mesh.
    """
    from torch.distributed.device_mesh import DeviceMesh

    _check_mesh(mesh)
    replicate = [DP_REPLICATE_AXIS]
    shard = [DP_SHARD_AXIS]
    (shard if config.shard_across_cp else replicate).append(CP_AXIS)
    replicate = [axis for axis in replicate if mesh[axis].size() > 1]
    shard = [axis for axis in shard if mesh[axis].size() > 1] or [DP_SHARD_AXIS]

    def one_axis(axes: list[str], flat_name: str) -> DeviceMesh:
        # _flatten is cached on the root mesh: calling this twice reuses the groups.
        return mesh[axes[0]] if len(axes) == 1 else mesh[tuple(axes)]._flatten(flat_name)

    shard_mesh = one_axis(shard, _SHARD_CP_AXIS)
    if not replicate:
        return shard_mesh
    replicate_mesh = one_axis(replicate, _REPLICATE_CP_AXIS)
    # Slicing a flattened and an original axis together is not supported, so
    # concatenate the two 1D meshes (same root mesh, same process groups).
    return DeviceMesh._concatenate([replicate_mesh, shard_mesh])
