"""Exponential moving average (EMA) of a model's weights, kept in fp32.

After every optimizer step::

    shadow <- decay_t * shadow + (1 - decay_t) * param

for every floating-point parameter; buffers (e.g. normalisation statistics)
are copied, not averaged. The shadow copies are fp32 even when the model
trains in bf16, because with ``decay`` close to 1 the per-step change
``(1 - decay) * (param - shadow)`` is far below bf16 resolution and would
round away.

``decay_t`` is ``decay``, or with ``warmup=True``
``min(decay, (1 + n) / (10 + n))`` where ``n`` is the number of updates
before this one (the TensorFlow ``ExponentialMovingAverage(num_updates=...)``
rule). Warmup lets the average forget the random initialisation quickly at
the start of training: 0.1 at the first update, 0.5 after 8, 0.9 after 80.

Pass the plain module, not a ``torch.compile`` wrapper, so that names match
``model.state_dict()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["DEFAULT_EMA_DECAY", "EMA", "warmup_decay"]

# A common choice for diffusion / flow models trained for 10^5+ steps.
DEFAULT_EMA_DECAY = 0.9999
# Constants of the warmup rule min(decay, (1 + n) / (10 + n)).
_WARMUP_OFFSET_NUMERATOR = 1
_WARMUP_OFFSET_DENOMINATOR = 10


def warmup_decay(decay: float, num_updates: int) -> float:
    """``min(decay, (1 + n) / (10 + n))`` for ``n = num_updates`` previous updates."""
    ramp = (_WARMUP_OFFSET_NUMERATOR + num_updates) / (_WARMUP_OFFSET_DENOMINATOR + num_updates)
    return min(decay, ramp)


class EMA:
    """fp32 shadow weights of ``model`` (see the module docstring for the rule).

    Args:
        model: The model to track; its current weights initialise the shadow.
            Every floating-point parameter in ``model.state_dict()`` is
            averaged (tied parameters once, reported under all their names);
            persistent buffers are copied.
        decay: The EMA decay in [0, 1]; 0 copies the weights, 1 freezes them.
        warmup: Use ``min(decay, (1 + n) / (10 + n))`` instead of ``decay``.
    """

    def __init__(self, model: nn.Module, *, decay: float = DEFAULT_EMA_DECAY, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0

        state_keys = set(model.state_dict().keys())
        # Tied parameters appear once in named_parameters() but under every name in
        # state_dict(): average once, report under each alias.
        self._aliases: dict[str, str] = {}
        canonical_by_id: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if name not in state_keys:
                continue
            canonical = canonical_by_id.setdefault(id(param), name)
            if canonical != name:
                self._aliases[name] = canonical
        self._shadow: dict[str, torch.Tensor] = {}
        self._copied: dict[str, torch.Tensor] = {}  # non-float params (if any) and buffers
        params = dict(model.named_parameters())
        for name, param in params.items():
            if name not in state_keys:
                continue
            if param.is_floating_point():
                self._shadow[name] = param.detach().to(dtype=torch.float32, copy=True)
            else:
                self._copied[name] = param.detach().clone()
        for name, buffer in model.named_buffers():
            if name in state_keys:  # non-persistent buffers are not part of the weights
                self._copied[name] = buffer.detach().clone()

    # ------------------------------------------------------------------ updating

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        return warmup_decay(self.decay, self.num_updates) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards ``model``'s weights by one step; call after ``optimizer.step()``."""
        decay = self.current_decay()
        model_tensors = self._model_tensors(model)
        shadow = list(self._shadow.values())
        # lerp needs matching dtypes and devices; .to() returns fp32 params on the
        # shadow's device as they are, without a copy.
        targets = [
            model_tensors[name].detach().to(device=value.device, dtype=value.dtype)
            for name, value in self._shadow.items()
        ]
        if shadow:
            # shadow + (1 - decay) * (param - shadow) == decay * shadow + (1 - decay) * param
            torch._foreach_lerp_(shadow, targets, 1.0 - decay)
        if self._copied:
            torch._foreach_copy_(
                list(self._copied.values()), [model_tensors[name].detach() for name in self._copied]
            )
        self.num_updates += 1

    # ------------------------------------------------------------------ using

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights with the EMA weights (cast to the model's dtypes)."""
        model_tensors = self._model_tensors(model)
        for name, value in (*self._shadow.items(), *self._copied.items()):
            model_tensors[name].copy_(value)

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (e.g. to evaluate or sample).

        The training weights are restored on exit, also after an exception::

            with ema.swapped_into(model):
                samples = sample(model, ...)
        """
        model_tensors = self._model_tensors(model)
        backup = {
            name: model_tensors[name].detach().clone() for name in (*self._shadow, *self._copied)
        }
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    model_tensors[name].copy_(value)

    def shadow_state_dict(self) -> dict[str, torch.Tensor]:
        """EMA weights keyed like ``model.state_dict()``, for ``model.load_state_dict``.

        Floating-point parameters are the fp32 shadow; buffers are the copied
        values. Tied parameters appear under each name (the same tensor). The
        tensors are the live shadow, not copies: do not modify them.
        """
        weights = {**self._shadow, **self._copied}
        for alias, canonical in self._aliases.items():
            weights[alias] = weights[canonical]
        return weights

    def state_dict(self) -> dict[str, Any]:
        """``{"num_updates": int, "shadow": shadow_state_dict()}``; the decay comes from the config."""
        return {"num_updates": self.num_updates, "shadow": self.shadow_state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the shadow may come from ``ema.safetensors``).

        Raises:
            ValueError: keys missing or unexpected, or shapes that differ.
        """
        if set(state) != {"num_updates", "shadow"}:
            raise ValueError(
                f"EMA state must have keys 'num_updates' and 'shadow', got {sorted(state)}"
            )
        shadow = state["shadow"]
        own = self.shadow_state_dict()
        missing = sorted(set(own) - set(shadow))
        unexpected = sorted(set(shadow) - set(own))
        if missing or unexpected:
            raise ValueError(f"EMA state mismatch: missing {missing}, unexpected {unexpected}")
        for name, target in (*self._shadow.items(), *self._copied.items()):
            value = shadow[name]
            if value.shape != target.shape:
                raise ValueError(
                    f"EMA state {name!r}: shape {tuple(value.shape)} != {tuple(target.shape)}"
                )
            target.copy_(value)
        self.num_updates = int(state["num_updates"])

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow to ``device`` (e.g. keep it on CPU to save accelerator memory)."""
        self._shadow = {name: t.to(device) for name, t in self._shadow.items()}
        self._copied = {name: t.to(device) for name, t in self._copied.items()}
        return self

    # ------------------------------------------------------------------ helpers

    def _model_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers by name; checks they match the shadow."""
        tensors: dict[str, torch.Tensor] = {**dict(model.named_parameters())}
        tensors.update(model.named_buffers())
        missing = [name for name in (*self._shadow, *self._copied) if name not in tensors]
        if missing:
            raise ValueError(
                f"model lacks {len(missing)} tensor(s) tracked by the EMA, e.g. {missing[:3]}; "
                "was the EMA built from a different model (or a torch.compile wrapper)?"
            )
        for name, value in (*self._shadow.items(), *self._copied.items()):
            if tensors[name].shape != value.shape:
                raise ValueError(
                    f"model tensor {name!r} has shape {tuple(tensors[name].shape)}, the EMA "
                    f"tracks {tuple(value.shape)}; was the EMA built from a different model?"
                )
        return tensors
