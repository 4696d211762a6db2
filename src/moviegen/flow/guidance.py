"""Classifier-free guidance (CFG): a conditional velocity pushed away from an unconditional one.

Given a conditional velocity model ``velocity_fn(x, t, cond) -> v``, the
guided velocity is::

    v = v_u + scale * (v_c - v_u),   v_c = velocity_fn(x, t, cond),  v_u = velocity_fn(x, t, uncond)

``scale = 1`` is plain conditional sampling (the unconditional branch is not
evaluated), ``scale = 0`` plain unconditional sampling (the conditional branch
is not evaluated), ``scale > 1`` strengthens the prompt.

**Guidance interval**: with ``interval=(lo, hi)`` the guided velocity is used
only at times ``lo <= t <= hi`` and the plain conditional velocity elsewhere
(Kynkaenniemi et al. 2024, "Applying guidance in a limited interval"). Strong
guidance near the data end (t close to 1) mostly sharpens and distorts detail
the model already gets right, while near the noise end it fixes layout and
motion; outside the interval only the conditional branch is evaluated, so
sampling is also cheaper.

**Negative prompts** need no special support: pass the negative prompt's
condition as ``uncond`` and the guided velocity moves away from it.

The conditions are opaque to this module (e.g. dicts of text embeddings and
masks), so it cannot batch them by itself. Give ``concat(cond, uncond)``, which
returns the condition of the doubled batch (conditional samples first), to
evaluate both branches in one call of ``velocity_fn`` on ``torch.cat([x, x])``:
one forward pass of twice the batch is usually faster than two passes.
Without it, ``velocity_fn`` is called twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["ClassifierFreeGuidance", "ConditionalVelocityFn", "check_interval"]

ConditionalVelocityFn = Callable[[Tensor, Tensor, Any], Tensor]

# Scales with a shortcut: only one branch contributes to the guided velocity.
_CONDITIONAL_ONLY_SCALE = 1.0
_UNCONDITIONAL_ONLY_SCALE = 0.0
# The guidance interval that covers every flow time.
_EVERY_TIME = (0.0, 1.0)


class ClassifierFreeGuidance:
    """A guided velocity function ``(x (B, ...), t (B,)) -> v (B, ...)`` for the solvers.

    Args:
        velocity_fn: The model, ``velocity_fn(x, t, cond) -> v`` of ``x``'s shape.
        cond: Condition of the prompt (passed through untouched).
        uncond: Condition of the empty prompt, or of a negative prompt.
        scale: Guidance scale, finite; 1 means no guidance.
        concat: Optional ``concat(cond, uncond)`` giving the condition of the
            batch ``torch.cat([x, x])`` (conditional half first), to evaluate
            both branches in a single call.
        interval: ``(lo, hi)`` with ``0 <= lo <= hi <= 1``: guide only at times
            in ``[lo, hi]``; None (default) guides at every time.
    """

    def __init__(
        self,
        velocity_fn: ConditionalVelocityFn,
        cond: Any,
        uncond: Any,
        scale: float,
        *,
        concat: Callable[[Any, Any], Any] | None = None,
        interval: tuple[float, float] | None = None,
    ):
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
        if interval is not None:
            interval = check_interval(interval)
        # The whole of [0, 1] is plain guidance: no per-step test of t.
        self.interval = None if interval == _EVERY_TIME else interval
        self.velocity_fn = velocity_fn
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)
        self.concat = concat
        # Built once: the conditions do not change during sampling.
        self._batched_cond = concat(cond, uncond) if concat is not None else None

    def __repr__(self) -> str:
        mode = "one batched call" if self.concat is not None else "two calls"
        where = (
            "" if self.interval is None else f", t in [{self.interval[0]:g}, {self.interval[1]:g}]"
        )
        return f"ClassifierFreeGuidance(scale={self.scale:g}{where}, {mode})"

    def _checked(self, v: Tensor, expected: torch.Size) -> Tensor:
        if v.shape != expected:
            raise ValueError(
                f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(expected)}"
            )
        return v

    def branches(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The conditional and unconditional velocities ``(v_c, v_u)``, each ``(B, ...)``."""
        if self._batched_cond is not None:
            x_both = torch.cat([x, x])  # (2B, ...)
            t_both = torch.cat([t, t])  # (2B,)
            v_both = self._checked(
                self.velocity_fn(x_both, t_both, self._batched_cond), x_both.shape
            )
            v_cond, v_uncond = v_both.chunk(2)
            return v_cond, v_uncond
        v_cond = self._checked(self.velocity_fn(x, t, self.cond), x.shape)
        v_uncond = self._checked(self.velocity_fn(x, t, self.uncond), x.shape)
        return v_cond, v_uncond

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """The guided velocity ``v_u + scale (v_c - v_u)``, ``(B, ...)``."""
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        if self.scale == _CONDITIONAL_ONLY_SCALE:
            return self._checked(self.velocity_fn(x, t, self.cond), x.shape)
        if self.scale == _UNCONDITIONAL_ONLY_SCALE and self.interval is None:
            return self._checked(self.velocity_fn(x, t, self.uncond), x.shape)
        if self.interval is None:
            v_cond, v_uncond = self.branches(x, t)
            return v_uncond + self.scale * (v_cond - v_uncond)
        lo, hi = self.interval
        inside = (t >= lo) & (t <= hi)  # (B,)
        if not bool(inside.any()):  # the solver's step is outside: conditional only
            return self._checked(self.velocity_fn(x, t, self.cond), x.shape)
        v_cond, v_uncond = self.branches(x, t)
        guided = v_uncond + self.scale * (v_cond - v_uncond)
        inside = inside.view(-1, *([1] * (x.dim() - 1)))  # (B, 1, ...)
        return torch.where(inside, guided, v_cond)


def check_interval(interval: tuple[float, float]) -> tuple[float, float]:
    """``(lo, hi)`` as floats, or ValueError unless ``0 <= lo <= hi <= 1``."""
    try:
        lo, hi = (float(value) for value in interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"guidance interval must be two numbers (lo, hi), got {interval!r}"
        ) from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    return lo, hi
