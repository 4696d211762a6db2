"""Training-time samplers of the flow time t in the open interval (0, 1).

Movie Gen draws ``t = sigmoid(n)`` with ``n ~ N(0, 1)`` (logit-normal), which
spends more training on the middle of the path, where the velocity is hardest
to predict, than on the nearly-pure-noise or nearly-clean ends. A uniform
sampler is provided for comparison. Time convention: t = 0 noise, t = 1 data
(see :mod:`moviegen.flow.path`).

Samplers are callables ``sampler(batch_size, *, generator=None, device=None)``
returning a float32 tensor of shape ``(B,)``. With a ``generator`` the draw
happens on the generator's device and is then moved to ``device``, so a seeded
generator gives the same times whatever device the batch lives on.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "TIMESTEP_SAMPLERS",
    "LogitNormalSampler",
    "TimestepSampler",
    "UniformSampler",
    "build_timestep_sampler",
]

# Samples are clamped to [T_EPS, 1 - T_EPS]: float32 sigmoid saturates to exactly
# 1.0 for logits above ~17 and torch.rand can return 0.0, while the open interval
# is promised. 1e-6 is well above float32 spacing just below 1 (~6e-8).
_T_EPS = 1e-6


class TimestepSampler(Protocol):
    """Anything callable as ``sampler(batch_size, *, generator=None, device=None) -> (B,)``."""

    def __call__(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor: ...


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _draw_device(generator: torch.Generator | None, device: torch.device | str | None):
    """Where to draw: the generator's own device if there is one (it must match), else ``device``."""
    return generator.device if generator is not None else device


def _finish(t: Tensor, device: torch.device | str | None) -> Tensor:
    return t.clamp(_T_EPS, 1.0 - _T_EPS).to(device=device)


class LogitNormalSampler:
    """``t = sigmoid(mean + std * n)`` with ``n ~ N(0, 1)``; the median is ``sigmoid(mean)``.

    Args:
        mean: Location of the normal in logit space (0: centred on t = 0.5;
            positive values favour the data end).
        std: Spread in logit space, > 0.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if not math.isfinite(mean):
            raise ValueError(f"mean must be finite, got {mean}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be finite and > 0, got {std}")
        self.mean = float(mean)
        self.std = float(std)

    def __repr__(self) -> str:
        return f"LogitNormalSampler(mean={self.mean:g}, std={self.std:g})"

    def __call__(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Times in (0, 1), float32, ``(batch_size,)``."""
        _check_batch_size(batch_size)
        normal = torch.randn(
            batch_size, generator=generator, device=_draw_device(generator, device)
        )  # (B,)
        return _finish(torch.sigmoid(self.mean + self.std * normal), device)


class UniformSampler:
    """``t ~ U(0, 1)``, kept strictly inside the interval."""

    def __repr__(self) -> str:
        return "UniformSampler()"

    def __call__(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Times in (0, 1), float32, ``(batch_size,)``."""
        _check_batch_size(batch_size)
        t = torch.rand(batch_size, generator=generator, device=_draw_device(generator, device))
        return _finish(t, device)


TIMESTEP_SAMPLERS: dict[str, type] = {
    "logit_normal": LogitNormalSampler,
    "uniform": UniformSampler,
}


def build_timestep_sampler(name: str, **kwargs: Any) -> TimestepSampler:
    """The sampler called ``name`` (``"logit_normal"`` or ``"uniform"``), built with ``kwargs``.

    Raises:
        ValueError: an unknown name.
        TypeError: keyword arguments the sampler does not take.
    """
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(
            f"unknown timestep sampler {name!r}; choose one of {sorted(TIMESTEP_SAMPLERS)}"
        )
    return TIMESTEP_SAMPLERS[name](**kwargs)
