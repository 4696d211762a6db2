"""Sampling-time schedules: the grid of times a solver steps through, from 0 (noise) to 1 (data).

A schedule of ``N`` steps is a float64 tensor of ``N + 1`` increasing times,
``schedule[0] == 0`` and ``schedule[-1] == 1`` exactly.

**Linear-quadratic** (Movie Gen, section 4 of ``docs/MOVIEGEN.md``): the first
``L = N // 2`` steps copy the first ``L`` steps of a fine uniform grid of
``G = linear_grid_steps`` steps (``t = 0, 1/G, ..., L/G``), where the sample is
still mostly noise and small steps matter; the remaining ``Q = N - L`` steps
cover ``L/G -> 1`` on a quadratic in the step index whose value and slope join
the linear part. With ``tau = L / G`` and ``d = L - tau N``::

    f(i) = i tau / L                        for i < L
    f(i) = a i^2 + b i + c                  for i >= L
    a = d / (L Q^2),  b = tau / L - 2 d / Q^2,  c = a L^2

so that ``f(L) = tau``, ``f'(L) = tau / L = 1 / G`` from both sides, and
``f(N) = 1``. For N = 50, G = 1000: 25 steps of 0.001, then 25 growing steps
from 0.025 to 1.

For odd ``N`` the linear part is the shorter one (``L = floor(N / 2)``); the
formulas above hold for any ``1 <= L < N``. ``N`` may not exceed ``G``: beyond
that the quadratic would be concave and could overshoot 1 (``d < 0``), and a
uniform grid of ``N`` steps would already be finer than the linear part.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_LINEAR_GRID_STEPS",
    "DEFAULT_NUM_SAMPLING_STEPS",
    "SCHEDULES",
    "build_schedule",
    "linear_quadratic_schedule",
    "linear_quadratic_time",
    "uniform_schedule",
]

# Movie Gen samples with 50 Euler steps ...
DEFAULT_NUM_SAMPLING_STEPS = 50
# ... whose first half follows a 1000-step uniform grid.
DEFAULT_LINEAR_GRID_STEPS = 1000
_MIN_LINEAR_QUADRATIC_STEPS = 2  # one linear step and one quadratic step


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_linear_quadratic(num_steps: int, linear_grid_steps: int) -> None:
    _check_int("num_steps", num_steps, _MIN_LINEAR_QUADRATIC_STEPS)
    _check_int("linear_grid_steps", linear_grid_steps, 1)
    if num_steps > linear_grid_steps:
        raise ValueError(
            f"the linear-quadratic schedule needs num_steps <= linear_grid_steps, got "
            f"{num_steps} > {linear_grid_steps}; use the uniform schedule or a finer grid"
        )


def linear_quadratic_time(
    step: Tensor,
    num_steps: int = DEFAULT_NUM_SAMPLING_STEPS,
    linear_grid_steps: int = DEFAULT_LINEAR_GRID_STEPS,
) -> Tensor:
    """The piecewise function ``f`` of the module docstring at real-valued step indices.

    Useful to inspect the join of the two pieces; :func:`linear_quadratic_schedule`
    evaluates it at ``0, 1, ..., N``.

    Args:
        step: Step indices in ``[0, num_steps]``, any shape; evaluated in float64.
        num_steps: ``N``, >= 2 and <= ``linear_grid_steps``.
        linear_grid_steps: ``G``, the fine uniform grid of the linear part.

    Returns:
        ``f(step)``, float64, same shape as ``step``.
    """
    _check_linear_quadratic(num_steps, linear_grid_steps)
    i = step.to(torch.float64)
    num_linear = num_steps // 2  # L
    num_quadratic = num_steps - num_linear  # Q
    tau = num_linear / linear_grid_steps
    d = num_linear - tau * num_steps
    a = d / (num_linear * num_quadratic**2)
    b = tau / num_linear - 2.0 * d / num_quadratic**2
    c = a * num_linear**2
    # i / G rather than i * tau / L (equal in exact arithmetic) so that the
    # linear part reproduces the uniform grid bit for bit.
    linear = i / linear_grid_steps
    quadratic = (a * i + b) * i + c
    return torch.where(i < num_linear, linear, quadratic)


def linear_quadratic_schedule(
    num_steps: int = DEFAULT_NUM_SAMPLING_STEPS,
    linear_grid_steps: int = DEFAULT_LINEAR_GRID_STEPS,
) -> Tensor:
    """Movie Gen's linear-quadratic schedule, float64 ``(num_steps + 1,)`` from 0 to exactly 1.

    Args:
        num_steps: Number of solver steps ``N``, >= 2 and <= ``linear_grid_steps``;
            odd values are allowed (the linear part then has ``N // 2`` steps).
        linear_grid_steps: The uniform grid whose first ``N // 2`` steps form the
            linear part (1000 in Movie Gen).

    Raises:
        TypeError: non-integer step counts.
        ValueError: ``num_steps < 2`` or ``num_steps > linear_grid_steps``.
    """
    _check_linear_quadratic(num_steps, linear_grid_steps)  # before arange sees a bad count
    schedule = linear_quadratic_time(
        torch.arange(num_steps + 1, dtype=torch.float64), num_steps, linear_grid_steps
    )
    schedule[-1] = 1.0  # f(N) = 1 analytically; remove the rounding error
    return schedule


def uniform_schedule(num_steps: int = DEFAULT_NUM_SAMPLING_STEPS) -> Tensor:
    """``num_steps`` equal steps, float64 ``(num_steps + 1,)`` from 0 to exactly 1.

    Raises:
        TypeError: a non-integer ``num_steps``.
        ValueError: ``num_steps < 1``.
    """
    _check_int("num_steps", num_steps, 1)
    return torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)


SCHEDULES: dict[str, Callable[[int], Tensor]] = {
    "linear_quadratic": linear_quadratic_schedule,
    "uniform": uniform_schedule,
}


def build_schedule(name: str, num_steps: int) -> Tensor:
    """The schedule called ``name`` (``"linear_quadratic"`` or ``"uniform"``), ``(num_steps + 1,)``.

    Raises:
        ValueError: an unknown name, or a ``num_steps`` the schedule does not accept.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_steps)
