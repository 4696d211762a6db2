"""What every trainer saves and restores for an exact resume, in one process or many.

Both trainers (TAE and text-to-video) keep the same training state: model, EMA,
optimizer, LR scheduler, the bucket sampler's position (the trainer owns the
epoch counter and the number of batches consumed), the global RNG states and
the training time spent. :class:`ResumableTraining` holds that logic once; a
trainer adds its own extra state (e.g. the TAE's discriminator) around it.

Two checkpoint formats, chosen by how the run was launched:

- **One process** (no torchrun, or ``WORLD_SIZE=1``):
  :class:`~moviegen.train.checkpoint.CheckpointManager` step folders in
  ``run_dir/checkpoints/`` with ``model.safetensors``, ``ema.safetensors`` and
  ``train_state.pt``; they resume the run and are what sampling loads.
- **Several processes** (``torchrun --nproc_per_node N``, N > 1): sharded DCP
  checkpoints in ``run_dir/dcp/checkpoints/`` (every rank writes its own
  shards; model, optimizer, EMA, scheduler, sampler position, per-rank RNG,
  step and training time) resume the run; rank 0 also writes a *consolidated*
  copy of the weights in the single-process format (no ``train_state.pt``) to
  ``run_dir/checkpoints/``, so ``load_t2v`` / ``load_tae`` (``moviegen sample``,
  ``moviegen tae reconstruct``, ``moviegen tae stats``) read a distributed run
  exactly as a single-process one.

Randomness that shapes a training step (timesteps, noise, caption dropout,
crops) is drawn from :func:`keyed_generator` streams keyed by the seed, the
micro-batch counter and, per sample, the sample's position in the *global*
batch. So it needs no saving (it follows from the step), it differs between
ranks (they hold different samples), and it is the same whatever the number of
ranks: one process and N ranks with the same global batch draw the same
numbers for the same samples.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moviegen.train.checkpoint import (
    COMPLETE_MARKER,
    TRAIN_STATE_FILENAME,
    Checkpoint,
)
from moviegen.train.distributed_run import any_rank, max_over_ranks
from moviegen.train.rng import capture_rng_state, restore_rng_state
from moviegen.train.schedule import budget_position

__all__ = [
    "DCP_DIRNAME",
    "ResumableTraining",
    "StateDictNames",
    "keyed_generator",
    "pick_device",
]

# Sub-folder of a run with the DCP checkpointer's own run folder (its
# ``checkpoints/`` hold the sharded training state of distributed runs).
DCP_DIRNAME = "dcp"
# Entries of the DCP state besides the model and the EMA (which use the names
# that export/read functions expect: moviegen.distributed.checkpoint.MODEL_KEY / EMA_KEY).
_OPTIMIZER_KEY = "optimizer"
_SCHEDULER_KEY = "scheduler"
_PROGRESS_KEY = "progress"
_RNG_KEY = "rng"


def pick_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative ints, e.g. ``(seed, stream, step)``.

    Distinct keys give independent streams (NumPy's ``SeedSequence`` hashes the
    key). Keys of one stream must all have the same length: ``SeedSequence``
    maps keys that differ only by trailing zeros to the same state.
    """
    state = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class StateDictNames:
    """A module's parameters and buffers under their ``state_dict()`` names.

    Activation-checkpoint wrappers insert ``_checkpoint_wrapped_module`` into
    ``named_parameters()`` but not into ``state_dict()`` keys. An
    :class:`~moviegen.train.ema.EMA` built from (and updated with) this view
    keeps the plain model's names, so its weights load into an unwrapped model.
    The names are matched by tensor identity (``state_dict(keep_vars=True)``).
    """

    def __init__(self, module: nn.Module):
        self.module = module
        names: dict[int, str] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            names.setdefault(id(tensor), name)
        self._names = names

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def _rename(self, named: Any) -> Any:
        for name, tensor in named:
            yield self._names.get(id(tensor), name), tensor

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:
        return self._rename(self.module.named_parameters(*args, **kwargs))

    def named_buffers(self, *args: Any, **kwargs: Any) -> Any:
        return self._rename(self.module.named_buffers(*args, **kwargs))


class ResumableTraining:
    """Mixin for trainers with ``model``, ``ema`` (or None), ``optimizer``,
    ``scheduler``, ``sampler``, ``step``, ``epoch``, ``consumed``,
    ``train_seconds``, ``run_dir``, ``device``, ``config`` (with ``keep_last``,
    ``async_checkpoint`` and ``export_every_checkpoint``), ``env`` (a
    :class:`~moviegen.train.distributed_run.RunEnv`), ``checkpoints`` (a
    :class:`~moviegen.train.checkpoint.CheckpointManager` for ``run_dir``) and,
    when distributed, ``dcp`` (from :meth:`_make_dcp_checkpointer`) attributes."""

    # ------------------------------------------------------------------ schedule

    def _step_scheduler(self) -> None:
        """Advance the LR schedule by one step. With ``fit_schedule_to_budget``
        and a ``time_budget_s``, jump ahead to :func:`budget_position` when the
        budget is being spent faster than the steps, so the schedule still ends
        when the budget stops the run (a slower machine gets a shorter, complete
        schedule rather than a cut-off one). The clock is the slowest rank's, so
        every rank uses the same rate. A run that never lags its budget's pace
        by more than the tolerance is never moved and is as reproducible as
        without a budget; one that does depends on time."""
        config = self.config
        if config.fit_schedule_to_budget and config.time_budget_s is not None:
            seconds = max_over_ranks(self.train_seconds, self.device)
            # The scheduler has taken `step` steps; LambdaLR.step() moves to last_epoch + 1.
            position = budget_position(
                self.step,
                config.steps,
                seconds,
                config.time_budget_s,
                warmup_steps=config.warmup_steps,
            )
            self.scheduler.last_epoch = max(self.scheduler.last_epoch, position - 1)
        self.scheduler.step()

    # ------------------------------------------------------------------ one process

    def save(self, *, final: bool = False) -> Path:
        """Checkpoint this step (every rank calls it when distributed); the
        trainer's ``_metadata()`` goes into the checkpoint."""
        if self.dcp is not None:
            return self._save_distributed(self._metadata(), final=final)
        return self.checkpoints.save(
            self.step,
            model_state=self.model.state_dict(),
            ema_state=self.ema.shadow_state_dict() if self.ema is not None else None,
            train_state=self._train_state(),
            metadata=self._metadata(),
        )

    def _train_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self._sampler_position(),
            "rng": capture_rng_state(),
            "train_seconds": self.train_seconds,
        }
        if self.ema is not None:
            state["ema_num_updates"] = self.ema.num_updates
        return state

    def _restore_state(self, checkpoint: Checkpoint) -> None:
        """Load everything :meth:`_train_state` saved (plus model and EMA weights)."""
        state = checkpoint.train_state
        if state is None:
            raise ValueError(
                f"{checkpoint.path} holds weights only (the consolidated copy of a distributed "
                f"run); resume the run with torchrun on as many processes as it was trained "
                f"on (its training state is in {self.run_dir / DCP_DIRNAME})"
            )
        self.model.load_state_dict(checkpoint.model_state)
        if self.ema is not None and checkpoint.ema_state is not None:
            self.ema.load_state_dict(
                {"shadow": checkpoint.ema_state, "num_updates": state["ema_num_updates"]}
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._load_sampler_position(state["sampler"])
        restore_rng_state(state["rng"])
        # Checkpoints of older versions also hold "generator": the trainers' one
        # stream, replaced by keyed_generator() streams that need no saving.
        self.step = checkpoint.step
        self.train_seconds = state["train_seconds"]

    def _sampler_position(self) -> dict[str, int]:
        # The loader runs ahead of training: save the batches consumed, not fetched.
        return {**self.sampler.state_dict(), "epoch": self.epoch, "offset": self.consumed}

    def _load_sampler_position(self, position: dict[str, int]) -> None:
        position = {key: int(value) for key, value in position.items()}
        self.sampler.load_state_dict(position)
        self.epoch = position["epoch"]
        self.consumed = position["offset"]
        if self.consumed >= len(self.sampler):  # saved right at the end of an epoch
            self.epoch, self.consumed = self.epoch + 1, 0

    # ------------------------------------------------------------------ several processes

    def _progress_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "sampler": self._sampler_position(),
            "train_seconds": self.train_seconds,
        }

    def _load_progress_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._load_sampler_position(state["sampler"])
        self.train_seconds = float(state["train_seconds"])

    def _dcp_state(self) -> dict[str, Any]:
        """The name -> Stateful mapping a DCP checkpoint holds (every rank builds it)."""
        from moviegen.distributed.checkpoint import (
            EMA_KEY,
            MODEL_KEY,
            EMAState,
            ModelState,
            OptimizerState,
            PerRank,
            RNGState,
            StateCallbacks,
        )

        state: dict[str, Any] = {
            MODEL_KEY: ModelState(self.model),
            _OPTIMIZER_KEY: OptimizerState(self.model, self.optimizer),
            _SCHEDULER_KEY: self.scheduler,
            _PROGRESS_KEY: StateCallbacks(self._progress_state, self._load_progress_state),
            # Global generators differ per rank (nothing draws from them in a
            # step, but whatever might is restored too).
            _RNG_KEY: PerRank(RNGState()),
        }
        if self.ema is not None:
            state[EMA_KEY] = EMAState(self.ema)
        return state

    def _make_dcp_checkpointer(self) -> Any:
        from moviegen.distributed.checkpoint import DistributedCheckpointer

        return DistributedCheckpointer(
            self.run_dir / DCP_DIRNAME,
            keep_last=self.config.keep_last,
            async_save=self.config.async_checkpoint,
        )

    def _resume_distributed(self, check_config: Callable[[dict[str, Any], Path], None]) -> bool:
        """Load the newest complete DCP checkpoint, if any; every rank calls it.

        ``check_config(saved_config, path)`` raises when the checkpoint was
        trained with an incompatible config (names or shapes that differ make
        the load itself raise, on every rank alike).
        """
        info = self.dcp.load(self._dcp_state())
        if info is None:
            single = self.checkpoints.latest()
            is_single = single is not None and (single / TRAIN_STATE_FILENAME).is_file()
            if any_rank(is_single, self.device):
                raise ValueError(
                    f"{self.run_dir} holds a single-process run; resume it without torchrun, "
                    "or start the distributed run in a new --out folder"
                )
            return False
        if info.config is not None:
            check_config(info.config, info.path)
        return True

    def _save_distributed(self, metadata: dict[str, Any], *, final: bool) -> Path:
        """Save a DCP checkpoint of this step (every rank calls it).

        Rank 0 also writes the consolidated single-process copy of the weights:
        of this checkpoint when it is the final one or ``export_every_checkpoint``
        is set; with ``async_checkpoint`` of the previous one, once committed.
        """
        from moviegen.config import config_to_dict

        previous = self.dcp.wait()  # commits a pending async save
        if previous is not None and self.config.export_every_checkpoint:
            self._consolidate(previous, metadata)
        folder = self.dcp.save(self.step, self._dcp_state(), config=config_to_dict(self.config))
        if (final or self.config.export_every_checkpoint) and not self.dcp.is_pending:
            self._consolidate(folder, metadata)
        return folder

    def _finish_distributed(self, metadata: dict[str, Any]) -> None:
        """Commit a pending async save and consolidate it (every rank calls it)."""
        folder = self.dcp.wait()
        self.dcp.close()
        if folder is not None:
            self._consolidate(folder, metadata)

    def _consolidate(self, folder: Path, metadata: dict[str, Any]) -> None:
        """Rank 0 reads the full model (and EMA) weights back from a complete DCP
        checkpoint and writes them as a single-process checkpoint (weights only)."""
        if not self.env.is_main:
            return
        from moviegen.distributed.checkpoint import EMA_KEY, MODEL_KEY, read_checkpoint

        step = int(json.loads((folder / COMPLETE_MARKER).read_text())["step"])
        weights = {}
        for name, prefix in (("model", f"{MODEL_KEY}."), ("ema", f"{EMA_KEY}.shadow.")):
            if name == "ema" and self.ema is None:
                weights[name] = None
                continue
            weights[name] = {
                key[len(prefix) :]: value
                for key, value in read_checkpoint(folder, prefix=prefix).items()
                if isinstance(value, torch.Tensor)
            }
        self.checkpoints.save(
            step, model_state=weights["model"], ema_state=weights["ema"], metadata=metadata
        )
