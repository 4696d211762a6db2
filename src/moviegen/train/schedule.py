"""Learning-rate schedules: linear warmup, then cosine decay or constant.

The schedule is a multiplier of the optimizer's base learning rate, as
``torch.optim.lr_scheduler.LambdaLR`` expects. With ``W = warmup_steps`` and
``T = total_steps``::

    step < W:        (step + 1) / (W + 1)                       # ~0 -> 1
    cosine, W..T:    r + (1 - r) * (1 + cos(pi * (step - W) / (T - W))) / 2
    cosine, >= T:    r                                           # r = min_lr_ratio
    constant, >= W:  1

The warmup starts just above zero rather than at zero, so the first optimizer
step is not wasted, and reaches exactly 1 at ``step == W`` where the decay
begins, so the curve is continuous.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

__all__ = [
    "DEFAULT_MIN_LR_RATIO",
    "FIT_TOLERANCE",
    "ScheduleKind",
    "budget_position",
    "build_scheduler",
    "lr_lambda",
]

ScheduleKind = Literal["cosine", "constant"]
_KINDS: tuple[str, ...] = ("cosine", "constant")
# How far (a share of the schedule) a run may lag the linear pace of its time
# budget before budget_position moves the schedule on.
FIT_TOLERANCE = 0.05
# Cosine decays to this fraction of the peak rather than to zero, so late steps still learn.
DEFAULT_MIN_LR_RATIO = 0.1


def lr_lambda(
    kind: ScheduleKind,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO,
) -> Callable[[int], float]:
    """The learning-rate multiplier as a function of the step (see the module docstring).

    Args:
        kind: ``"cosine"`` (decay to ``min_lr_ratio`` at ``total_steps``) or
            ``"constant"`` (stay at 1 after warmup; ``min_lr_ratio`` unused).
        warmup_steps: Steps of linear warmup (0: start at the peak).
        total_steps: Length of the run; the cosine reaches its floor here.
        min_lr_ratio: Final multiplier of the cosine, in [0, 1].

    Raises:
        ValueError: an unknown kind or inconsistent step counts.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {_KINDS}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"step counts must be >= 0, got {warmup_steps=}, {total_steps=}")
    if kind == "cosine" and total_steps < warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    # A run with no decay phase sits at the floor right after warmup.
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: ScheduleKind,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_lambda`; call ``scheduler.step()`` after each optimizer step.

    Its ``state_dict()`` holds only the step counter and learning rates (the
    multiplier is a plain function, rebuilt from the config on resume), so it
    can be stored in a checkpoint's ``train_state``.

    On resume, build the scheduler *before* ``optimizer.load_state_dict``: the
    ``LambdaLR`` constructor writes ``base_lr * multiplier(0)`` into the
    optimizer's param groups, which would overwrite a restored learning rate.
    Then load the scheduler's state.
    """
    schedule = lr_lambda(
        kind, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def budget_position(
    step: int,
    total_steps: int,
    seconds: float,
    budget_s: float,
    *,
    warmup_steps: int = 0,
    tolerance: float = FIT_TOLERANCE,
) -> int:
    """Where a schedule over ``total_steps`` should be after ``step`` steps and
    ``seconds`` of a ``budget_s`` time budget: at ``step``, or further on when
    the budget runs out before the steps do, so that the schedule (nearly) ends
    when the budget does. Never past ``total_steps``.

    The pace is linear in time: after a fraction ``f`` of the budget the
    schedule should be at ``f * total_steps``. A run may lag that pace by
    ``tolerance`` of the schedule before it is moved on (and is then kept that
    far behind), so the budget ends it at most that far from the schedule's end,
    where a cosine has all but reached its floor. Start-up and the speed's ups
    and downs stay inside that lag on a machine fast enough for its budget:
    such a run is never moved, so it is as reproducible as one without a
    budget (measured on the demo's runs: the TAE lagged by at most 3.1% of its
    schedule, the transformer 0.5%).

    The first ``warmup_steps`` are never skipped: the warmup protects the first
    updates, which are counted in steps, not seconds. (Measured: a TAE run whose
    start-up and slower steps pulled the position ahead reached the peak rate
    at step 45 instead of 100; its loss stayed above that of the run warmed up
    in full, and it ended at 30.7 dB against 34.5 dB; docs/BENCHMARKS.md.)
    """
    if budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    if step < warmup_steps:
        return step
    by_time = math.floor(total_steps * min(1.0, seconds / budget_s))
    return max(step, by_time - math.floor(tolerance * total_steps))  # <= total_steps
