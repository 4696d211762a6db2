"""Parallel training of the transformer: device mesh, FSDP2, activation
checkpointing, compile and context parallel, applied from outside the model.

- :mod:`moviegen.distributed.mesh`: :class:`ParallelConfig` and the
  ``(dp_replicate, dp_shard, cp)`` device mesh.
- :mod:`moviegen.distributed.parallelize`: CP -> AC -> compile -> FSDP2 on the
  transformer, meta-device construction and seeded init, frozen encoders.
- :mod:`moviegen.distributed.planner`: the per-GPU memory and step-time
  estimate behind ``moviegen plan``.
- :mod:`moviegen.distributed.spawn`: run a function on N gloo CPU processes
  (tests and benchmarks of the above on one machine).

The package exports the public names of ``mesh`` and ``parallelize``.
Importing this package needs no process group; the FSDP2 machinery of
``parallelize`` is imported on first use of one of its names.
"""

from __future__ import annotations

import importlib
from typing import Any

from moviegen.distributed import mesh as _mesh
from moviegen.distributed.mesh import *  # noqa: F403 (re-exports exactly mesh.__all__)

# Public names of moviegen.distributed.parallelize, served lazily by __getattr__
# (its FSDP2 imports cost about half a second, which users of the planner alone
# should not pay). Reading parallelize.__all__ would import it, so the names are
# listed here and parallelize.__all__ is built from this tuple.
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

__all__ = [*_mesh.__all__, *_PARALLELIZE_NAMES]


def __getattr__(name: str) -> Any:
    if name in _PARALLELIZE_NAMES:
        return getattr(importlib.import_module("moviegen.distributed.parallelize"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
