"""Classifier-free guidance (CFG): a conditional velocity pushed away from an unconditional one.

Given a conditional velocity model ``velocity_fn(x, t, cond) -> v``, the
guided velocity is::

    v = v_u + scale * (v_c - v_u),   v_c = velocity_fn(x, t, cond),  v_u = velocity_fn(x, t, uncond)

``scale = 1`` is plain conditional sampling (the unconditional branch is not
evaluated), ``scale = 0`` plain unconditional sampling (the conditional branch
is not evaluated), ``scale > 1`` strengthens the prompt.

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

__all__ = ["ClassifierFreeGuidance", "ConditionalVelocityFn"]

ConditionalVelocityFn = Callable[[Tensor, Tensor, Any], Tensor]

# Scales with a shortcut: only one branch contributes to the guided velocity.
_CONDITIONAL_ONLY_SCALE = 1.0
_UNCONDITIONAL_ONLY_SCALE = 0.0


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
    """

    def __init__(
        self,
        velocity_fn: ConditionalVelocityFn,
        cond: Any,
        uncond: Any,
        scale: float,
        *,
        concat: Callable[[Any, Any], Any] | None = None,
    ):
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
        self.velocity_fn = velocity_fn
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)
        self.concat = concat
        # Built once: the conditions do not change during sampling.
        self._batched_cond = concat(cond, uncond) if concat is not None else None

    def __repr__(self) -> str:
        mode = "one batched call" if self.concat is not None else "two calls"
        return f"ClassifierFreeGuidance(scale={self.scale:g}, {mode})"

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
        if self.scale == _UNCONDITIONAL_ONLY_SCALE:
            return self._checked(self.velocity_fn(x, t, self.uncond), x.shape)
        v_cond, v_uncond = self.branches(x, t)
        return v_uncond + self.scale * (v_cond - v_uncond)
