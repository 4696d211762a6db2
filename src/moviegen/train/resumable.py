"""What every trainer saves and restores for an exact resume.

Both trainers (TAE and text-to-video) keep the same training state: model, EMA,
optimizer, LR scheduler, the bucket sampler's position (the trainer owns the
epoch counter and the number of batches consumed), the global RNG states, the
trainer's own generator and the training time spent. :class:`ResumableTraining`
holds that logic once; a trainer adds its own extra state (e.g. the TAE's
discriminator) around :meth:`_train_state` and :meth:`_restore_state`.
"""

from __future__ import annotations

from typing import Any

import torch

from moviegen.train.checkpoint import Checkpoint
from moviegen.train.rng import capture_rng_state, restore_rng_state

__all__ = ["ResumableTraining", "pick_device"]


def pick_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ResumableTraining:
    """Mixin for trainers with ``model``, ``ema`` (or None), ``optimizer``,
    ``scheduler``, ``sampler``, ``generator``, ``step``, ``epoch``, ``consumed``
    and ``train_seconds`` attributes."""

    def _train_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": {**self.sampler.state_dict(), "epoch": self.epoch, "offset": self.consumed},
            "rng": capture_rng_state(),
            "generator": self.generator.get_state(),
            "train_seconds": self.train_seconds,
        }
        if self.ema is not None:
            state["ema_num_updates"] = self.ema.num_updates
        return state

    def _restore_state(self, checkpoint: Checkpoint) -> None:
        """Load everything :meth:`_train_state` saved (plus model and EMA weights)."""
        state = checkpoint.train_state
        self.model.load_state_dict(checkpoint.model_state)
        if self.ema is not None and checkpoint.ema_state is not None:
            self.ema.load_state_dict(
                {"shadow": checkpoint.ema_state, "num_updates": state["ema_num_updates"]}
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.epoch = state["sampler"]["epoch"]
        self.consumed = state["sampler"]["offset"]
        if self.consumed >= len(self.sampler):  # saved right at the end of an epoch
            self.epoch, self.consumed = self.epoch + 1, 0
        restore_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        self.step = checkpoint.step
        self.train_seconds = state["train_seconds"]
