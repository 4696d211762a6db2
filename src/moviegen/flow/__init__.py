"""Flow matching: THE time convention (t = 0 noise, t = 1 data), path, samplers, schedules, solvers, CFG.

- :mod:`~moviegen.flow.path`: the straight path ``X_t = t X_1 + (1 - (1 - sigma_min) t) X_0``,
  its velocity target and the data estimate implied by a velocity.
- :mod:`~moviegen.flow.timesteps`: training-time samplers of t (logit-normal, uniform).
- :mod:`~moviegen.flow.schedules`: sampling-time grids (linear-quadratic, uniform).
- :mod:`~moviegen.flow.solvers`: Euler and Heun integration of any ``velocity_fn(x, t)``, and
  Euler with fresh noise (``stochastic_euler_solve``).
- :mod:`~moviegen.flow.guidance`: classifier-free guidance around ``velocity_fn(x, t, cond)``.
"""

from __future__ import annotations

from moviegen.flow.guidance import ClassifierFreeGuidance, ConditionalVelocityFn
from moviegen.flow.path import SIGMA_MIN, FlowPath
from moviegen.flow.schedules import (
    DEFAULT_LINEAR_GRID_STEPS,
    DEFAULT_NUM_SAMPLING_STEPS,
    build_schedule,
    linear_quadratic_schedule,
    linear_quadratic_time,
    uniform_schedule,
)
from moviegen.flow.solvers import (
    NoiseFn,
    VelocityFn,
    euler_solve,
    heun_solve,
    solve,
    stochastic_euler_solve,
)
from moviegen.flow.timesteps import (
    LogitNormalSampler,
    TimestepSampler,
    UniformSampler,
    build_timestep_sampler,
)

__all__ = [
    "DEFAULT_LINEAR_GRID_STEPS",
    "DEFAULT_NUM_SAMPLING_STEPS",
    "SIGMA_MIN",
    "ClassifierFreeGuidance",
    "ConditionalVelocityFn",
    "FlowPath",
    "LogitNormalSampler",
    "NoiseFn",
    "TimestepSampler",
    "UniformSampler",
    "VelocityFn",
    "build_schedule",
    "build_timestep_sampler",
    "euler_solve",
    "heun_solve",
    "linear_quadratic_schedule",
    "linear_quadratic_time",
    "solve",
    "stochastic_euler_solve",
    "uniform_schedule",
]
