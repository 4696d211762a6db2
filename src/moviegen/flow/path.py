"""The flow-matching probability path and THE time convention of this project.

Time runs from noise to data: **t = 0 is pure noise, t = 1 is data.** Every
sampler, schedule, solver and model in ``moviegen`` uses this convention.

With noise ``X_0 ~ N(0, I)``, a normalised data latent ``X_1`` and a small
``sigma_min`` (Movie Gen uses ``1e-5``), the path and its velocity are::

    X_t = t X_1 + (1 - (1 - sigma_min) t) X_0
    V   = d X_t / d t = X_1 - (1 - sigma_min) X_0        # constant in t

``sigma_min`` keeps a sliver of noise at t = 1 (``X_1 + sigma_min X_0``), so
the end point of the path is never exactly the data. Because the path is a
straight line, a velocity ``v`` predicted at ``(X_t, t)`` implies estimates of
both end points::

    X_1 ~ (1 - sigma_min) X_t + (1 - (1 - sigma_min) t) v
    X_0 ~ X_t - t v

which are exact when ``v`` is the true target ``V``.

Time tensors have shape ``(B,)``, one time per sample, and broadcast over the
remaining dimensions of the latents (e.g. ``(B, C, T, H, W)``).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["SIGMA_MIN", "FlowPath"]

# Noise left at t = 1, as in the Movie Gen paper; keeps the path away from a
# degenerate point mass at the data.
SIGMA_MIN = 1e-5


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )


def _broadcast_time(t: Tensor, like: Tensor) -> Tensor:
    """``t`` of shape ``(B,)`` reshaped to ``(B, 1, ..., 1)`` in ``like``'s dtype and device."""
    if like.dim() < 1:
        raise ValueError("latents need a leading batch dimension, got a 0-dim tensor")
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"t must have shape (B,) = ({like.shape[0]},), one time per sample, "
            f"got {tuple(t.shape)}; use t.expand(B) for a shared time"
        )
    return t.to(dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


class FlowPath:
    """The straight flow-matching path from noise (t = 0) to data (t = 1).

    Args:
        sigma_min: Noise scale left at t = 1, in [0, 1).

    All methods take latents of any shape ``(B, ...)`` and times of shape
    ``(B,)``; results have the latents' shape and dtype.
    """

    def __init__(self, sigma_min: float = SIGMA_MIN):
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)

    def __repr__(self) -> str:
        return f"FlowPath(sigma_min={self.sigma_min:g})"

    @property
    def _noise_decay(self) -> float:
        """``1 - sigma_min``: how much of the noise the velocity removes per unit time."""
        return 1.0 - self.sigma_min

    def noise_scale(self, t: Tensor | float) -> Tensor | float:
        """``1 - (1 - sigma_min) t``: the weight of the noise ``X_0`` in ``X_t``
        (1 at t = 0, ``sigma_min`` at t = 1), for a float or a broadcast tensor."""
        return 1.0 - self._noise_decay * t

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """``X_t = t X_1 + (1 - (1 - sigma_min) t) X_0``.

        Args:
            x0: Noise, ``(B, ...)``.
            x1: Data latents, ``(B, ...)``.
            t: Times in [0, 1], ``(B,)``.

        Returns:
            ``X_t``, ``(B, ...)``.
        """
        _check_same_shape("x0", x0, "x1", x1)
        t = _broadcast_time(t, x1)
        return t * x1 + self.noise_scale(t) * x0

    def velocity_target(self, x0: Tensor, x1: Tensor) -> Tensor:
        """The regression target ``V = X_1 - (1 - sigma_min) X_0``, ``(B, ...)`` (independent of t)."""
        _check_same_shape("x0", x0, "x1", x1)
        return x1 - self._noise_decay * x0

    def predict_x1(self, xt: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """The data estimate implied by velocity ``v`` at ``(xt, t)``, e.g. for sample previews.

        Inverts the path: exact when ``v`` is the true :meth:`velocity_target`.

        Args:
            xt: Points on the path, ``(B, ...)``.
            v: Velocities at ``(xt, t)``, ``(B, ...)``.
            t: Times, ``(B,)``.

        Returns:
            ``(1 - sigma_min) X_t + (1 - (1 - sigma_min) t) v``, ``(B, ...)``.
        """
        _check_same_shape("xt", xt, "v", v)
        t = _broadcast_time(t, xt)
        return self._noise_decay * xt + self.noise_scale(t) * v

    def predict_x0(self, xt: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """The noise estimate ``X_t - t v`` implied by velocity ``v`` at ``(xt, t)``, ``(B, ...)``."""
        _check_same_shape("xt", xt, "v", v)
        t = _broadcast_time(t, xt)
        return xt - t * v
