"""Parallel training of the transformer: device mesh, FSDP2, activation
checkpointing, compile and context parallel, applied from outside the model.

- :mod:`moviegen.distributed.mesh`: :class:`ParallelConfig` and the
  ``(dp_replicate, dp_shard, cp)`` device mesh.
- :mod:`moviegen.distributed.parallelize`: CP -> AC -> compile -> FSDP2 on the
  transformer, meta-device construction and seeded init, frozen encoders.
- :mod:`moviegen.distributed.planner`: the per-GPU memory and step-time
  estimate behind ``moviegen plan``.

Importing this package needs no process group; the FSDP2 machinery of
``parallelize`` is imported on first use of one of its names.
"""

from __future__ import annotations

import importlib
from typing import Any

from moviegen.distributed.mesh import (
    AC_MODES,
    MESH_AXES,
    ParallelConfig,
    build_mesh,
    cp_mesh,
    data_parallel_rank,
    data_parallel_size,
    fsdp_mesh,
)

# Names served lazily from moviegen.distributed.parallelize (its FSDP2 imports
# cost about half a second, which users of the planner alone should not pay).
_PARALLELIZE_NAMES = (
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "build_parallel_model",
    "find_transformer",
    "init_parallel_weights",
    "parallelize_transformer",
    "place_frozen_module",
)

__all__ = [
    "AC_MODES",
    "MESH_AXES",
    "ParallelConfig",
    "build_mesh",
    "cp_mesh",
    "data_parallel_rank",
    "data_parallel_size",
    "fsdp_mesh",
    *_PARALLELIZE_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _PARALLELIZE_NAMES:
        return getattr(importlib.import_module("moviegen.distributed.parallelize"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
