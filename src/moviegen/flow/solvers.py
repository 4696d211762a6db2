"""ODE solvers that integrate a velocity field along a time schedule.

A velocity function is ``velocity_fn(x, t) -> v`` with ``x`` of shape
``(B, ...)``, ``t`` of shape ``(B,)`` holding the same time for every sample,
and ``v`` of ``x``'s shape. The solvers know nothing about networks, text or
guidance: wrap a model with :class:`moviegen.flow.guidance.ClassifierFreeGuidance`
(or a lambda) to get one. Integration runs from ``schedule[0]`` to
``schedule[-1]``; with the usual schedules that is noise (t = 0) to data (t = 1).

The state is carried in at least float32 (float64 stays float64): with a bf16
state, the early steps of the linear-quadratic schedule (0.001 each) would be
below bf16 resolution and round away. ``velocity_fn`` therefore receives
float32 inputs for bf16 latents (the model casts, or runs under autocast),
and the result is cast back to ``x0``'s dtype.

``callback(step_index, t, x)``, when given, is called after every step with
the 0-based index of the step just taken, the (Python float) time the state
has reached, and the state itself; use it for previews (with
:meth:`moviegen.flow.path.FlowPath.predict_x1`) or logging. Do not modify ``x``
in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

__all__ = ["SOLVERS", "StepCallback", "VelocityFn", "euler_solve", "heun_solve", "solve"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, float, Tensor], None]


def _schedule_times(schedule: Tensor | Sequence[float]) -> list[float]:
    """The schedule as Python floats, after checking it is a 1-D finite grid of >= 2 points."""
    times = torch.as_tensor(schedule, dtype=torch.float64)
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError(
            f"schedule must be 1-D with at least 2 times (start and end), got shape "
            f"{tuple(times.shape)}; build one with moviegen.flow.build_schedule"
        )
    if not bool(torch.isfinite(times).all()):
        raise ValueError("schedule contains non-finite times")
    return times.tolist()


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise ValueError(f"x0 must be a floating-point tensor, got {dtype}")
    return torch.promote_types(dtype, torch.float32)


def _velocity(velocity_fn: VelocityFn, x: Tensor, t: float) -> Tensor:
    """``velocity_fn`` at state ``x`` and time ``t`` (broadcast to ``(B,)``), in ``x``'s dtype."""
    t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)
    v = velocity_fn(x, t_batch)
    if v.shape != x.shape:
        raise ValueError(
            f"velocity_fn returned shape {tuple(v.shape)} for a state of shape {tuple(x.shape)}"
        )
    return v.to(x.dtype)


def _integrate(
    name: str,
    step_fn: Callable[[Tensor, float, float], Tensor],
    x0: Tensor,
    schedule: Tensor | Sequence[float],
    progress: bool,
    callback: StepCallback | None,
) -> Tensor:
    times = _schedule_times(schedule)
    if x0.dim() < 1:
        raise ValueError("x0 needs a leading batch dimension, got a 0-dim tensor")
    x = x0.to(_state_dtype(x0.dtype))
    num_steps = len(times) - 1
    for step_index in tqdm(range(num_steps), desc=name, disable=not progress):
        t_start, t_end = times[step_index], times[step_index + 1]
        x = step_fn(x, t_start, t_end)
        if callback is not None:
            callback(step_index, t_end, x)
    return x.to(x0.dtype)


def euler_solve(
    velocity_fn: VelocityFn,
    x0: Tensor,
    schedule: Tensor | Sequence[float],
    *,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """First-order Euler: ``x <- x + (t_{k+1} - t_k) v(x, t_k)``; one evaluation per step.

    Exact for any velocity that is constant along the trajectory, e.g. the
    straight flow-matching path.

    Args:
        velocity_fn: ``(x (B, ...), t (B,)) -> v (B, ...)``.
        x0: Start state at ``schedule[0]``, ``(B, ...)`` (noise for sampling).
        schedule: 1-D times ``(N + 1,)``; N steps from ``schedule[0]`` to ``schedule[-1]``.
        progress: Show a tqdm progress bar.
        callback: ``callback(step_index, t, x)`` after every step (module docstring).

    Returns:
        The state at ``schedule[-1]``, ``x0``'s shape and dtype.
    """

    def step(x: Tensor, t_start: float, t_end: float) -> Tensor:
        return x + (t_end - t_start) * _velocity(velocity_fn, x, t_start)

    return _integrate("euler", step, x0, schedule, progress, callback)


def heun_solve(
    velocity_fn: VelocityFn,
    x0: Tensor,
    schedule: Tensor | Sequence[float],
    *,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """Second-order Heun (explicit trapezoid); two evaluations per step.

    Every step, the last included, is a full Heun step: an Euler predictor
    ``x' = x + h v(x, t_k)`` and the corrector ``x + h (v(x, t_k) + v(x', t_{k+1})) / 2``.
    Unlike diffusion samplers that end at a singular noise level, the
    flow-matching velocity is well defined at t = 1, so the last step does not
    fall back to Euler. Exact for velocities affine in t (independent of x).

    Arguments and return value as :func:`euler_solve`.
    """

    def step(x: Tensor, t_start: float, t_end: float) -> Tensor:
        h = t_end - t_start
        v_start = _velocity(velocity_fn, x, t_start)
        x_predicted = x + h * v_start
        v_end = _velocity(velocity_fn, x_predicted, t_end)
        return x + (0.5 * h) * (v_start + v_end)

    return _integrate("heun", step, x0, schedule, progress, callback)


SOLVERS: dict[str, Callable[..., Tensor]] = {"euler": euler_solve, "heun": heun_solve}


def solve(
    velocity_fn: VelocityFn,
    x0: Tensor,
    schedule: Tensor | Sequence[float],
    *,
    method: str = "euler",
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """Integrate with the solver called ``method`` (``"euler"`` or ``"heun"``); see :func:`euler_solve`.

    Raises:
        ValueError: an unknown method, a malformed schedule or a velocity of the wrong shape.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown solver method {method!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[method](velocity_fn, x0, schedule, progress=progress, callback=callback)
