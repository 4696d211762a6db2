"""Capture and restore every global random generator, for bit-exact resume.

The captured state holds only tensors, ints, floats, strings, ``None`` and
dicts, so it can be stored in a checkpoint's ``train_state`` and read back with
``torch.load(weights_only=True)``.

Covered: Python's ``random`` module, NumPy's *legacy global* generator
(``np.random.*``), torch's CPU generator and, when CUDA is available, every
CUDA device's generator. Generators owned by objects (``np.random.Generator``,
``torch.Generator``, samplers) are not global: their owners must save them.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the global random generators.

    Returns:
        ``{"python": {...}, "numpy": {...}, "torch": uint8 tensor, "cuda": [uint8
        tensor per device]}``; ``"cuda"`` is present only when CUDA is available.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            # 625 words < 2**32 each: int64 holds them exactly.
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state`.

    CUDA states are restored for the devices present; if the number of devices
    differs from the captured run (or CUDA is now absent), a warning says so
    and the extra states are ignored.

    Raises:
        ValueError: ``state`` misses one of the CPU generators.
    """
    missing = [name for name in ("python", "numpy", "torch") if name not in state]
    if missing:
        raise ValueError(f"RNG state lacks {missing}; was it made by capture_rng_state()?")

    python = state["python"]
    random.setstate(
        (
            int(python["version"]),
            tuple(int(word) for word in python["state"].tolist()),
            python["gauss_next"],
        )
    )

    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    )

    torch.set_rng_state(state["torch"].to(device="cpu", dtype=torch.uint8))

    cuda_states = state.get("cuda")
    if cuda_states is None:
        return
    num_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_devices != len(cuda_states):
        warnings.warn(
            f"RNG state has {len(cuda_states)} CUDA generator(s) but {num_devices} device(s) "
            "are visible; restoring the first min() of them",
            RuntimeWarning,
            stacklevel=2,
        )
    for device, cuda_state in enumerate(cuda_states[:num_devices]):
        torch.cuda.set_rng_state(cuda_state.to(device="cpu", dtype=torch.uint8), device)
