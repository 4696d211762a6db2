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

:func:`stochastic_euler_solve` is the one solver that knows the path: each step
it splits the state into the data and noise estimates that the velocity
implies, replaces a share of the noise estimate by fresh noise and moves to
the next time along the path (DDIM's eta, written for the flow path).

``callback(step_index, t, x)``, when given, is called after every step with
the 0-based index of the step just taken, the (Python float) time the state
has reached, and the state itself; use it for previews (with
:meth:`moviegen.flow.path.FlowPath.predict_x1`) or logging. Do not modify ``x``
in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from moviegen.flow.path import FlowPath

__all__ = [
    "SOLVERS",
    "NoiseFn",
    "StepCallback",
    "VelocityFn",
    "euler_solve",
    "heun_solve",
    "solve",
    "stochastic_euler_solve",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, float, Tensor], None]
# ``noise_fn(x) -> eps``: fresh standard normal noise of ``x``'s shape (for the
# stochastic solver; the caller decides how it is seeded, e.g. one generator per row).
NoiseFn = Callable[[Tensor], Tensor]


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


def stochastic_euler_solve(
    velocity_fn: VelocityFn,
    x0: Tensor,
    schedule: Tensor | Sequence[float],
    *,
    eta: float,
    noise_fn: NoiseFn,
    path: FlowPath | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler with fresh noise (DDIM's ``eta`` on the flow path); one evaluation per step.

    At ``(x, t)`` the velocity ``v`` implies a data estimate ``x1`` and a noise
    estimate ``n`` (:meth:`FlowPath.predict_x1`, :meth:`FlowPath.predict_x0`:
    ``x = t x1 + c_t n`` with ``c_t = 1 - (1 - sigma_min) t``). The step to
    ``s`` lands on the path point at ``s`` between ``x1`` and the noise
    ``sqrt(1 - r^2) n + r eps`` (``eps = noise_fn(x)``), where ``r c_s`` is
    ``eta`` times the spread of ``X_s`` given ``X_t`` and ``X_1`` on the path
    (the DDPM posterior): ``r = eta * sqrt(1 - (t c_s / (s c_t))^2)``. With
    ``eta = 1`` that is ancestral sampling, ``eta = 0`` is :func:`euler_solve`;
    for an exact velocity every ``eta`` keeps the path's marginals as the steps
    shrink, while errors of a learned velocity are partly forgotten instead of
    carried to the end. The step that reaches ``schedule[-1]`` adds no noise.

    Args:
        velocity_fn, x0, schedule, progress, callback: as :func:`euler_solve`.
        eta: Share of the posterior spread drawn afresh, in ``[0, 1]``.
        noise_fn: ``noise_fn(x) -> eps`` of ``x``'s shape (see :data:`NoiseFn`).
        path: The flow path the velocity was trained on (its ``sigma_min``);
            default ``FlowPath()``.

    Returns:
        The state at ``schedule[-1]``, ``x0``'s shape and dtype.

    Raises:
        ValueError: ``eta`` outside ``[0, 1]``, noise of the wrong shape, or
            anything :func:`euler_solve` refuses.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    path = FlowPath() if path is None else path
    end = _schedule_times(schedule)[-1]

    def renewed_share(t: float, s: float) -> float:
        """``r`` of the docstring for a step from ``t`` to ``s``."""
        c_t, c_s = path.noise_scale(t), path.noise_scale(s)
        kept = t * c_s / (s * c_t) if s > 0 else 1.0
        return eta * math.sqrt(max(0.0, 1.0 - min(kept, 1.0) ** 2))

    def step(x: Tensor, t_start: float, t_end: float) -> Tensor:
        v = _velocity(velocity_fn, x, t_start)
        if eta == 0.0 or t_end == end:
            return x + (t_end - t_start) * v
        t_now = torch.full((x.shape[0],), t_start, dtype=x.dtype, device=x.device)
        data, noise = path.predict_x1(x, v, t_now), path.predict_x0(x, v, t_now)
        eps = noise_fn(x)
        if eps.shape != x.shape:
            raise ValueError(
                f"noise_fn returned shape {tuple(eps.shape)} for a state of shape {tuple(x.shape)}"
            )
        share = renewed_share(t_start, t_end)
        fresh = math.sqrt(1.0 - share * share) * noise + share * eps.to(x.device, x.dtype)
        return path.interpolate(fresh, data, torch.full_like(t_now, t_end))

    return _integrate("euler", step, x0, schedule, progress, callback)


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
