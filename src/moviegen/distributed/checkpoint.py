"""Distributed (DCP) training checkpoints: atomic, resumable, one code path for 1 or N ranks.

Built on ``torch.distributed.checkpoint`` (DCP): every rank writes only its own
shards (FSDP2 ``DTensor`` parameters, optimizer moments, EMA shadow), and a
checkpoint saved on N ranks loads on M ranks (resharding), except for state
that is per rank by nature (RNG; see :class:`PerRank`). Without an initialised
process group everything runs in one process, so the laptop and the cluster
share this code.

Layout of one run::

    run_dir/checkpoints/
      step_00000100/
        __0_0.distcp ...    DCP shards, one file per rank
        .metadata           DCP index (pickled; read with an allow-list, see below)
        config.json         resolved run config (when given to save())
        COMPLETE            written last by rank 0: format, step, world size, entries
      step_00000200/ ...

Step folders are named, listed, published and pruned like
:mod:`moviegen.train.checkpoint`'s (both build on
:class:`moviegen.train.checkpoint_files.StepFolders`), so both kinds sort and
list alike; the ``COMPLETE`` marker's ``"format": "dcp"`` tells them apart.

Atomic completion. All ranks write into a hidden ``.step_00000200.tmp``;
``dcp.save`` returns on every rank only after all ranks' shards and the DCP
index are written; rank 0 then writes ``config.json`` and ``COMPLETE``, fsyncs
and renames the folder to ``step_00000200`` (atomic within a file system); the
other ranks wait for rank 0's word (a broadcast that also relays its errors), so when :meth:`DistributedCheckpointer.save` returns on
any rank the checkpoint is complete and visible. A crash (or ``kill -9``) at
any point leaves the previous checkpoints untouched plus a temp folder that
:meth:`~DistributedCheckpointer.latest` ignores and the next save deletes.

Asynchronous saves (``async_save=True``) copy the state to CPU memory before
``save`` returns (training may then change the weights) and write the files in
a background thread over a dedicated gloo process group. The checkpoint is
committed (marker + rename + retention) by the next :meth:`~DistributedCheckpointer.save`,
:meth:`~DistributedCheckpointer.load`, :meth:`~DistributedCheckpointer.wait`
or :meth:`~DistributedCheckpointer.close`; until then it is not "latest".

What a trainer saves is a flat mapping ``name -> Stateful`` (anything with
``state_dict()`` / ``load_state_dict()``, e.g. an LR scheduler) or plain state
(a dict; on load DCP replaces the entry in the mapping). Entry names must not
contain dots (DCP joins nested keys with dots). The wrappers here adapt the rest:

- :class:`ModelState`: a plain or FSDP2-sharded module, through
  ``get_model_state_dict`` / ``set_model_state_dict`` (canonical FQNs, no
  ``_orig_mod.`` prefixes, sharded ``DTensor`` values);
- :class:`OptimizerState`: ``get_optimizer_state_dict`` /
  ``set_optimizer_state_dict`` (state keyed by parameter FQN, so it reshards);
- :class:`EMAState`: a :class:`moviegen.train.ema.EMA` or a plain dict of
  (D)tensors, stored as ``{"shadow": {fqn: tensor}, "num_updates": n}``;
- :class:`RNGState`: the global Python / NumPy / torch CPU / CUDA generators
  and optionally a ``torch.Generator``; wrap it in :class:`PerRank`;
- :class:`PerRank`: stores each rank's own copy under ``rank_<r>`` and
  restores each rank's own (a checkpoint with per-rank state only loads on the
  same number of ranks; leave the entry out of the state to load the rest);
- :class:`StateCallbacks`: a getter/setter pair, e.g. for the sampler position.

A trainer (``ResumableTraining``) would use it like this::

    ckpt = DistributedCheckpointer(run_dir, keep_last=3, async_save=False)

    def dcp_state(self):
        state = {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "scheduler": self.scheduler,
            "progress": StateCallbacks(self._progress_state, self._load_progress_state),
            "rng": PerRank(RNGState(generator=self.generator)),
        }
        if self.ema is not None:
            state["ema"] = EMAState(self.ema)  # export_consolidated(ema=True) reads "ema"
        return state

    info = ckpt.load(self.dcp_state())     # None: nothing to resume
    if info is not None:
        self.step = info.step
    ...
    ckpt.save(self.step, self.dcp_state(), config=self.config)   # every rank calls it
    ...
    ckpt.close()                                                  # commits a pending async save

    # After training, on one machine without torch.distributed:
    export_consolidated(run_dir, "transformer.safetensors", ema=True)

Every rank must call ``save`` / ``load`` / ``wait`` / ``close`` (and the
constructor, which makes the async process group) at the same points.

Security. DCP's ``.metadata`` index is a pickle and DCP's default loader
unpickles non-tensor values with ``weights_only=False``. Here the index is read
with an unpickler that only admits DCP's metadata classes, ``torch.Size``,
dtypes and paths, and non-tensor values with ``torch.load(weights_only=True)``,
so loading a tampered checkpoint raises instead of running code. Non-tensor
state must therefore be numbers, strings, bools, ``None``, lists, tuples and
dicts of them (optimizer, scheduler and RNG state qualify); ``save`` checks
this before writing and names the offending key.

Names. ``ModelState`` stores canonical names (``get_model_state_dict`` drops
``torch.compile`` / activation-checkpoint wrapper prefixes); an EMA must be
built from the plain module so that its names match, or the exported EMA will
not load into the plain model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file as save_safetensors
from torch import nn
from torch.distributed.checkpoint import (
    CheckpointException,
    DefaultLoadPlanner,
    FileSystemReader,
    FileSystemWriter,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from moviegen.config import config_to_dict, fsync_dir
from moviegen.train.checkpoint import CONFIG_METADATA_KEY
from moviegen.train.checkpoint_files import (
    COMPLETE_MARKER,
    DEFAULT_KEEP_LAST,
    StepFolders,
    check_weights_only_safe,
    fsync_file,
    write_synced,
)
from moviegen.train.rng import capture_rng_state, restore_rng_state

__all__ = [
    "CONFIG_FILENAME",
    "DCP_FORMAT",
    "DEFAULT_KEEP_LAST",
    "EMA_KEY",
    "MODEL_KEY",
    "CheckpointInfo",
    "DistributedCheckpointer",
    "EMAState",
    "ModelState",
    "OptimizerState",
    "PerRank",
    "RNGState",
    "StateCallbacks",
    "export_consolidated",
    "fill_lazy_optimizer_state",
    "read_checkpoint",
    "resolve_checkpoint",
]

# Value of the marker's "format" field; single-process checkpoints have none.
DCP_FORMAT = "dcp"
# Bumped when the layout changes incompatibly.
FORMAT_VERSION = 1
# Resolved run config, written by rank 0 into the step folder.
CONFIG_FILENAME = "config.json"
# State entries that export_consolidated() reads: ModelState / EMAState under these names.
MODEL_KEY = "model"
EMA_KEY = "ema"
# Inside an EMAState entry: the weights, keyed like the model's state dict.
EMA_SHADOW_KEY = "shadow"
# PerRank stores rank r's state under f"{PER_RANK_PREFIX}{r}".
PER_RANK_PREFIX = "rank_"
# Indentation of the JSON files: small, read by people.
_JSON_INDENT = 2
# How many key names an error message lists before "...".
_MAX_KEYS_IN_ERROR = 8
# safetensors header entry that tells readers (e.g. transformers) the tensor framework.
_SAFETENSORS_HEADER = {"format": "pt"}

_PER_RANK_KEY_RE = re.compile(rf"^{PER_RANK_PREFIX}(\d+)$")
# DCP warns on every single-process call that it "assumes the intent"; that is our intent.
_NO_DIST_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized"
# Errors of rank-0-only work that reach the other ranks with their own type.
_RELAYED_ERRORS: dict[str, type[Exception]] = {
    "FileNotFoundError": FileNotFoundError,
    "ValueError": ValueError,
    "OSError": OSError,
}


# ============================================================================ Stateful wrappers


class ModelState(Stateful):
    """A plain or FSDP2-sharded module as DCP state.

    ``state_dict()`` is ``get_model_state_dict(model)``: canonical parameter
    and buffer names (wrappers such as ``torch.compile`` removed) mapped to
    tensors, sharded ``DTensor`` s under FSDP2. Loading is strict: the
    checkpointer checks names and shapes first and names the mismatches.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModelState needs an nn.Module, got {type(model).__name__}")
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))

    def tensor_templates(self) -> dict[str, torch.Tensor]:
        """Name -> tensor (global shape) that a load must find in the checkpoint."""
        return self.state_dict()


@torch.no_grad()
def fill_lazy_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter without optimizer state the state its first step would create.

    A parameter that has never had a gradient (e.g. a temporal layer that
    one-frame latents never reach) has no Adam state. A fresh optimizer being
    loaded from DCP expects state for *every* parameter (``set_optimizer_state_dict``
    initialises all of them first), so such a checkpoint would not load. The
    state made here is the optimizer's own lazy initialisation (zero moments,
    step 0): exactly what the first real gradient would have created, so
    training is unchanged.
    """
    init_group = getattr(optimizer, "_init_group", None)
    if init_group is None:  # not an Adam-family optimizer: nothing lazy to fill
        return
    for group in optimizer.param_groups:
        missing = [
            param
            for param in group["params"]
            if param.requires_grad and param.grad is None and not optimizer.state.get(param)
        ]
        if not missing:
            continue
        for param in missing:
            param.grad = torch.zeros_like(param)
        try:
            # Only the state is wanted; the lists it fills are dropped.
            init_group(group, [], [], [], [], [], [])
        finally:
            for param in missing:
                param.grad = None


class OptimizerState(Stateful):
    """An optimizer of a plain or FSDP2-sharded module as DCP state.

    Uses ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, which key
    the state by parameter name (not position) and initialise a fresh
    optimizer's state before a load, so a new optimizer can be loaded into.
    Saving first gives parameters that never had a gradient their (empty)
    initial state (:func:`fill_lazy_optimizer_state`), so that such a load
    finds state for every parameter.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        fill_lazy_optimizer_state(self.optimizer)
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class EMAState(Stateful):
    """EMA weights as DCP state: ``{"shadow": {name: tensor}, "num_updates": n}``.

    Args:
        ema: A :class:`moviegen.train.ema.EMA` (anything whose ``state_dict()``
            has ``"shadow"`` and ``"num_updates"`` and that has a matching
            ``load_state_dict``), or a mutable mapping name -> tensor (a bare
            shadow; its tensors are overwritten in place on load and no update
            count is stored). Under FSDP2 the shadow tensors may be DTensors
            (an EMA built from the sharded model has sharded shadows).

    The shadow is keyed like the model's state dict, so
    :func:`export_consolidated` can write it as model weights.
    """

    def __init__(self, ema: Any):
        self._is_mapping = isinstance(ema, MutableMapping)
        if not self._is_mapping and not (
            callable(getattr(ema, "state_dict", None))
            and callable(getattr(ema, "load_state_dict", None))
        ):
            raise TypeError(
                "EMAState needs an EMA object (state_dict/load_state_dict) or a dict of "
                f"tensors, got {type(ema).__name__}"
            )
        self.ema = ema

    def state_dict(self) -> dict[str, Any]:
        if self._is_mapping:
            return {EMA_SHADOW_KEY: dict(self.ema)}
        state = dict(self.ema.state_dict())
        if EMA_SHADOW_KEY not in state:
            raise ValueError(
                f"{type(self.ema).__name__}.state_dict() has no {EMA_SHADOW_KEY!r} entry "
                f"(keys {sorted(state)}); EMAState expects moviegen.train.ema.EMA's layout"
            )
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._is_mapping:
            self.ema.load_state_dict(state_dict)
            return
        # DCP loads into the tensors that state_dict() returned, i.e. our own;
        # copy only what was replaced (e.g. a caller passing a fresh dict).
        for name, value in state_dict[EMA_SHADOW_KEY].items():
            target = self.ema[name]
            if value is not target:
                target.copy_(value)

    def tensor_templates(self) -> dict[str, torch.Tensor]:
        """Shadow name -> tensor (global shape) that a load must find in the checkpoint."""
        return dict(self.state_dict()[EMA_SHADOW_KEY])


class RNGState(Stateful):
    """The global random generators, plus optionally one ``torch.Generator``.

    Global generators: see :func:`moviegen.train.rng.capture_rng_state` (Python,
    NumPy legacy, torch CPU, every CUDA device). They differ per rank, so
    store this inside :class:`PerRank`.

    Args:
        generator: A generator owned by the trainer (e.g. for data noise), or None.
    """

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"global": capture_rng_state()}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_rng_state(state_dict["global"])
        if self.generator is not None:
            self.generator.set_state(state_dict["generator"].to(device="cpu", dtype=torch.uint8))


class PerRank(Stateful):
    """State that differs per rank (RNG), stored once per rank and restored to its own rank.

    ``state_dict()`` is ``{"rank_<r>": inner.state_dict()}`` with ``r`` this
    process's global rank (0 without a process group), so the ranks' copies
    do not collide in the checkpoint; a load requests only this rank's key.

    Args:
        inner: Any Stateful, e.g. :class:`RNGState`.
    """

    def __init__(self, inner: Stateful):
        if not isinstance(inner, Stateful):
            raise TypeError(f"PerRank needs a Stateful, got {type(inner).__name__}")
        self.inner = inner

    @property
    def key(self) -> str:
        """This rank's key in the checkpoint."""
        return f"{PER_RANK_PREFIX}{_global_rank()}"

    def state_dict(self) -> dict[str, Any]:
        return {self.key: self.inner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict[self.key])


class StateCallbacks(Stateful):
    """A getter / setter pair as Stateful, for state that lives in several attributes.

    Example: the sampler position of ``ResumableTraining``::

        StateCallbacks(
            lambda: {**self.sampler.state_dict(), "epoch": self.epoch, "offset": self.consumed},
            self._load_sampler_position,
        )

    Args:
        getter: Returns the current state (dict of tensors / plain values); on
            load it provides the template, so its keys must not depend on the
            values.
        setter: Receives the loaded state.
    """

    def __init__(
        self, getter: Callable[[], dict[str, Any]], setter: Callable[[dict[str, Any]], None]
    ):
        self._getter = getter
        self._setter = setter

    def state_dict(self) -> dict[str, Any]:
        return self._getter()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._setter(state_dict)


# ============================================================================ checkpointer


@dataclass(kw_only=True, frozen=True)
class CheckpointInfo:
    """What :meth:`DistributedCheckpointer.load` loaded."""

    # Training step the checkpoint was taken at.
    step: int
    # The step folder it was read from.
    path: Path
    # Number of ranks that saved it.
    world_size: int
    # Contents of config.json, or None when save() got no config.
    config: dict[str, Any] | None


@dataclass(kw_only=True)
class _PendingSave:
    """An async save whose files are still being written."""

    step: int
    temp: Path
    final: Path
    config_text: str | None
    entries: list[str]
    future: Any  # concurrent.futures.Future or AsyncSaveResponse


class DistributedCheckpointer(StepFolders):
    """Saves, finds and loads DCP checkpoints of one run (see the module docstring).

    Args:
        run_dir: The run's folder; checkpoints go to ``run_dir/checkpoints``.
            On a cluster it must be on a file system that all ranks share.
        keep_last: How many complete checkpoints to keep (oldest deleted after
            each commit; the one just committed is always kept). ``None``
            keeps all.
        async_save: Write checkpoints in a background thread (see the module
            docstring). With a process group this creates a gloo group here,
            so all ranks must construct the checkpointer together.
        process_group: Group of the ranks that hold the state; default: all.
    """

    # All ranks write into the same temp folder: ".step_00000100.tmp", no pid.
    HIDDEN_NAMES_WITH_PID = False

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        keep_last: int | None = DEFAULT_KEEP_LAST,
        async_save: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ):
        super().__init__(run_dir, keep_last=keep_last)
        self.async_save = bool(async_save)
        self._distributed = dist.is_available() and dist.is_initialized()
        if process_group is not None and not self._distributed:
            raise ValueError("process_group given but torch.distributed is not initialised")
        self._group = process_group
        # The background writer runs collectives while training runs its own on the
        # default group; sharing one group between two threads could interleave
        # them, so async saves get their own (gloo: async_save needs a CPU backend).
        self._async_group = (
            dist.new_group(
                ranks=None
                if process_group is None
                else dist.get_process_group_ranks(process_group),
                backend="gloo",
            )
            if self.async_save and self._distributed
            else None
        )
        self._pending: _PendingSave | None = None

    # ------------------------------------------------------------------ properties

    @property
    def rank(self) -> int:
        """Rank within the checkpointer's group (0 without a process group)."""
        return dist.get_rank(self._group) if self._distributed else 0

    @property
    def world_size(self) -> int:
        """Ranks in the checkpointer's group (1 without a process group)."""
        return dist.get_world_size(self._group) if self._distributed else 1

    @property
    def is_pending(self) -> bool:
        """Whether an async save has been started but not yet committed."""
        return self._pending is not None

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: Mapping[str, Any], *, config: Any | None = None) -> Path:
        """Save ``state`` as the checkpoint of ``step``; every rank must call it.

        A pending async save is committed first. Leftovers of interrupted saves
        are deleted. Synchronous mode: returns once the checkpoint is complete
        on disk. Async mode: returns once the state has been copied; the
        checkpoint becomes complete at the next commit point (:meth:`wait`).

        Args:
            step: Training step (>= 0); names the folder. A complete checkpoint
                of the same step is replaced.
            state: name -> Stateful or plain state (see the module docstring).
                Use :data:`MODEL_KEY` / :data:`EMA_KEY` for the model / EMA so
                that :func:`export_consolidated` finds them.
            config: The resolved run config (a dataclass or JSON-able mapping),
                written to ``config.json`` in the step folder.

        Returns:
            The step folder (which exists once the save is committed).

        Raises:
            ValueError: a negative step, an empty state, a key that is not a
                dot-free string, a config that is not JSON-serialisable, or a
                non-tensor value that ``torch.load(weights_only=True)`` would
                refuse (e.g. a NumPy scalar); the message names the key. Raised
                before anything is written.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        entries = _check_state(state)
        config_text = None if config is None else _config_json(config)
        self.wait()
        # Take the state now (as DCP would) to check it: a value that the
        # weights_only loader refuses would otherwise surface only on resume.
        snapshot = {
            key: value.state_dict() if isinstance(value, Stateful) else value
            for key, value in state.items()
        }
        check_weights_only_safe(snapshot, "state")

        final = self._final_dir(step)
        temp = self._temp_dir(final)
        # Nobody writes before rank 0 has cleared the way.
        self._on_rank0(lambda: self._start_save(temp))

        writer = FileSystemWriter(temp, sync_files=True, overwrite=False)
        if self.async_save:
            if not self._distributed:
                # The async save runs dcp.save in a worker thread, after
                # _quiet_no_dist has restored the filters, so the warning needs
                # a filter that stays (only this message, process-wide).
                warnings.filterwarnings("ignore", message=_NO_DIST_WARNING, category=UserWarning)
            with _quiet_no_dist():
                future = dcp.async_save(
                    snapshot,
                    storage_writer=writer,
                    process_group=self._async_group,
                    no_dist=not self._distributed,
                )
            self._pending = _PendingSave(
                step=step,
                temp=temp,
                final=final,
                config_text=config_text,
                entries=entries,
                future=future,
            )
            return final
        with _quiet_no_dist():
            dcp.save(
                snapshot,
                storage_writer=writer,
                process_group=self._group,
                no_dist=not self._distributed,
            )
        return self._commit(step, temp, final, config_text, entries)

    def wait(self) -> Path | None:
        """Finish and commit a pending async save; every rank must call it.

        Returns:
            The committed step folder, or None when no save was pending.

        Raises:
            RuntimeError: the background save failed (its temp folder is left
                for the next save to delete; earlier checkpoints are intact).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        future = getattr(pending.future, "upload_completion", pending.future)
        try:
            future.result()
        except CheckpointException as error:  # a BaseException: keep it out of bare handlers
            raise RuntimeError(f"async save of step {pending.step} failed: {error}") from None
        return self._commit(
            pending.step, pending.temp, pending.final, pending.config_text, pending.entries
        )

    def close(self) -> None:
        """Commit a pending async save and release the async process group."""
        self.wait()
        if self._async_group is not None:
            dist.destroy_process_group(self._async_group)
            self._async_group = None

    def __enter__(self) -> DistributedCheckpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _commit(
        self, step: int, temp: Path, final: Path, config_text: str | None, entries: list[str]
    ) -> Path:
        """Rank 0 marks the temp folder complete and moves it into place; all ranks wait."""

        def commit() -> None:
            if config_text is not None:
                write_synced(temp / CONFIG_FILENAME, config_text.encode())
            marker = {
                "format": DCP_FORMAT,
                "format_version": FORMAT_VERSION,
                "step": step,
                "world_size": self.world_size,
                "entries": entries,
            }
            _write_completion_marker(temp, marker)
            self._publish(temp, final)

        self._on_rank0(commit)
        return final

    # list(), latest() and resolve() come from StepFolders.

    # ------------------------------------------------------------------ loading

    def load(
        self, state: Mapping[str, Any], *, path: str | os.PathLike[str] | None = None
    ) -> CheckpointInfo | None:
        """Load a checkpoint into ``state`` in place; every rank must call it.

        Args:
            state: name -> Stateful / plain state, as given to :meth:`save`; it
                may hold fewer entries than the checkpoint (the rest is not
                read). Plain (non-Stateful) entries are replaced in ``state``,
                which must then be a mutable mapping.
            path: A run dir, checkpoints dir or step dir (see :func:`resolve_checkpoint`).
                None: the newest complete checkpoint of this run, or nothing.

        Returns:
            What was loaded, or None when ``path`` is None and this run has no
            complete checkpoint yet (nothing to resume).

        Raises:
            FileNotFoundError: ``path`` holds no complete checkpoint.
            ValueError: not a DCP checkpoint, an entry the checkpoint lacks,
                model/EMA names or shapes that differ (the message names them),
                per-rank state saved by a different number of ranks, or any
                other mismatch DCP reports.
        """
        _check_state(state)
        self.wait()
        # Rank 0 chooses, so that all ranks load the same checkpoint even while
        # a shared file system's listings lag.
        resolved = self._on_rank0(self.latest if path is None else lambda: resolve_checkpoint(path))
        if resolved is None:
            return None
        marker = _read_marker(resolved)
        metadata = _SafeFileSystemReader(resolved).read_metadata()
        _check_compatible(state, marker, metadata, resolved, self.world_size)
        reader = _SafeFileSystemReader(resolved)
        try:
            with _quiet_no_dist():
                dcp.load(
                    state,
                    storage_reader=reader,
                    planner=_SafeLoadPlanner(),
                    process_group=self._group,
                    no_dist=not self._distributed,
                )
        except CheckpointException as error:
            raise ValueError(f"{resolved}: DCP could not load the state: {error}") from None
        config_path = resolved / CONFIG_FILENAME
        return CheckpointInfo(
            step=int(marker["step"]),
            path=resolved,
            world_size=int(marker["world_size"]),
            config=json.loads(config_path.read_text()) if config_path.is_file() else None,
        )

    # ------------------------------------------------------------------ helpers

    def _on_rank0(self, work: Callable[[], Path | None]) -> Path | None:
        """Run ``work`` on rank 0 only; every rank returns its result or raises its error.

        The broadcast doubles as a barrier (no rank returns before rank 0 is
        done), and an error on rank 0 reaches every rank instead of leaving
        them waiting in the next collective.
        """
        if not self._distributed:
            return work()
        box: list[Any] = [None, None]
        local_error: Exception | None = None
        if self.rank == 0:
            try:
                result = work()
                box = [None if result is None else str(result), None]
            except Exception as error:
                local_error = error
                box = [None, (type(error).__name__, str(error))]
        src = dist.get_global_rank(self._group_or_world(), 0)
        dist.broadcast_object_list(box, src=src, group=self._group)
        if local_error is not None:
            raise local_error  # rank 0 keeps the original traceback
        result, error = box
        if error is not None:
            kind, message = error
            error_type = _RELAYED_ERRORS.get(kind, RuntimeError)
            raise error_type(message if kind in _RELAYED_ERRORS else f"{kind}: {message}")
        return None if result is None else Path(result)

    def _group_or_world(self) -> dist.ProcessGroup:
        return self._group if self._group is not None else dist.group.WORLD


# ============================================================================ offline reading


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Find a complete DCP checkpoint from a run dir, checkpoints dir or step dir.

    A run dir or checkpoints dir resolves to its newest complete checkpoint.

    Raises:
        FileNotFoundError: ``path`` does not exist, is an incomplete step
            folder, or holds no complete checkpoint.
    """
    return DistributedCheckpointer.resolve(path)


def read_checkpoint(checkpoint: str | os.PathLike[str], *, prefix: str = "") -> dict[str, Any]:
    """Read (part of) a DCP checkpoint into one process, unsharded, on the CPU.

    Needs no process group: this is how to inspect or convert a checkpoint
    after training.

    Args:
        checkpoint: Anything :func:`resolve_checkpoint` accepts.
        prefix: Read only entries whose flat key starts with it, e.g.
            ``"model."``; the prefix is kept in the returned keys.

    Returns:
        Flat key -> value, where keys join the nesting with dots (``"model.0.weight"``,
        ``"optimizer.state.0.weight.exp_avg"``, ``"rng.rank_1.global.torch"``):
        full tensors (freshly allocated, contiguous, not sharing memory) and
        plain values.

    Raises:
        FileNotFoundError: see :func:`resolve_checkpoint`.
        ValueError: not a DCP checkpoint, or nothing under ``prefix``.
    """
    folder = resolve_checkpoint(checkpoint)
    _read_marker(folder)
    metadata = _SafeFileSystemReader(folder).read_metadata()
    state: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        if not key.startswith(prefix):
            continue
        if isinstance(item, TensorStorageMetadata):
            state[key] = torch.empty(item.size, dtype=item.properties.dtype)
        elif isinstance(item, BytesStorageMetadata):
            state[key] = None  # placeholder; DCP replaces it with the stored value
    if not state:
        raise ValueError(f"{folder}: no entries under {prefix!r}")
    with _quiet_no_dist():
        # Flat keys without nesting: DCP's flattening maps each onto itself.
        dcp.load(
            state,
            storage_reader=_SafeFileSystemReader(folder),
            planner=_SafeLoadPlanner(),
            no_dist=True,
        )
    return state


def export_consolidated(
    checkpoint: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    ema: bool = True,
) -> Path:
    """Write a checkpoint's model (or EMA) weights as one safetensors file + JSON.

    Runs offline in one process (no process group), however many ranks saved
    the checkpoint. The result loads on one device without torch.distributed::

        model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

    Args:
        checkpoint: Anything :func:`resolve_checkpoint` accepts (a run dir
            exports its newest complete checkpoint).
        out_path: The ``.safetensors`` file to write; its metadata goes next
            to it with the suffix ``.json`` (``{"config": ..., "step": ...,
            "weights": "ema" | "model", "source": ...}``). Both are written
            atomically (temp file + rename).
        ema: Export the EMA weights (entry :data:`EMA_KEY`) instead of the
            training weights (entry :data:`MODEL_KEY`).

    Returns:
        ``out_path``.

    Raises:
        FileNotFoundError: see :func:`resolve_checkpoint`.
        ValueError: the checkpoint has no such entry (e.g. no EMA: pass
            ``ema=False``), or ``out_path`` does not end in ``.safetensors``.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"out_path must end in .safetensors, got {out_path}")
    folder = resolve_checkpoint(checkpoint)
    marker = _read_marker(folder)
    entry = EMA_KEY if ema else MODEL_KEY
    prefix = f"{EMA_KEY}.{EMA_SHADOW_KEY}." if ema else f"{MODEL_KEY}."
    metadata = _SafeFileSystemReader(folder).read_metadata()
    if not any(
        key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
        for key, item in metadata.state_dict_metadata.items()
    ):
        hint = "; it has no EMA: pass ema=False" if ema and MODEL_KEY in marker["entries"] else ""
        raise ValueError(
            f"{folder}: no {entry!r} weights to export (entries {marker['entries']}){hint}"
        )
    flat = read_checkpoint(folder, prefix=prefix)
    # read_checkpoint allocates every tensor afresh: contiguous and unshared, as
    # safetensors requires.
    tensors = {
        key[len(prefix) :]: value for key, value in flat.items() if isinstance(value, torch.Tensor)
    }
    config_path = folder / CONFIG_FILENAME
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": int(marker["step"]),
        "weights": entry,
        "source": str(folder),
        "num_tensors": len(tensors),
    }
    if config_path.is_file():
        info[CONFIG_METADATA_KEY] = json.loads(config_path.read_text())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_path(out_path) as temp:
        save_safetensors(tensors, temp, metadata=_SAFETENSORS_HEADER)
        fsync_file(temp)
    json_text = json.dumps(info, indent=_JSON_INDENT, allow_nan=False) + "\n"
    with _atomic_path(out_path.with_suffix(".json")) as temp:
        write_synced(temp, json_text.encode())
    fsync_dir(out_path.parent)
    return out_path


# ============================================================================ safe DCP reading


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor values with ``weights_only=True``.

    DCP's own ``load_bytes`` unpickles them with ``weights_only=False``, which
    would run code from a tampered checkpoint.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            _set_nested(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` index and nothing else (no arbitrary globals)."""

    _ALLOWED = frozenset(
        {
            *(
                ("torch.distributed.checkpoint.metadata", name)
                for name in (
                    "Metadata",
                    "TensorStorageMetadata",
                    "BytesStorageMetadata",
                    "TensorProperties",
                    "ChunkStorageMetadata",
                    "MetadataIndex",
                    "StorageMeta",
                    "_MEM_FORMAT_ENCODING",
                )
            ),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"),
            # StorageMeta.checkpoint_id is the folder's path.
            *(
                (module, name)
                for module in ("pathlib", "pathlib._local")
                for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
            ),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name} from a checkpoint index: not a DCP "
            "metadata type (a tampered or foreign checkpoint?)"
        )


class _SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose ``.metadata`` is read with :class:`_RestrictedUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with open(path, "rb") as file:
            metadata = _RestrictedUnpickler(file).load()
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not a DCP metadata file (got {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


# ============================================================================ helpers


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextmanager
def _quiet_no_dist():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING, category=UserWarning)
        yield


def _check_state(state: Mapping[str, Any]) -> list[str]:
    """Sorted entry names; raises for what DCP would reject later and less clearly."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping name -> Stateful, got {type(state).__name__}")
    if not state:
        raise ValueError("state is empty: nothing to save or load")
    bad = [key for key in state if not isinstance(key, str) or not key or "." in key]
    if bad:
        # Dots would be ambiguous in DCP's flat keys ("model.0.weight").
        raise ValueError(f"state keys must be non-empty strings without dots, got {bad}")
    return sorted(state)


def _config_json(config: Any) -> str:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        data = config_to_dict(config)
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise ValueError(
            f"config must be a dataclass instance or a mapping, got {type(config).__name__}"
        )
    try:
        # allow_nan=False: NaN/Infinity are not JSON and other readers choke on them.
        return json.dumps(data, indent=_JSON_INDENT, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise ValueError(f"config must be JSON-serialisable: {error}") from error


def _read_marker(folder: Path) -> dict[str, Any]:
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    if marker.get("format") != DCP_FORMAT:
        raise ValueError(
            f"{folder} is not a DCP checkpoint (a single-process checkpoint? load it with "
            "moviegen.train.checkpoint.CheckpointManager)"
        )
    if marker.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder}: checkpoint format version {marker.get('format_version')!r}, this code "
            f"reads {FORMAT_VERSION}"
        )
    return marker


def _check_compatible(
    state: Mapping[str, Any],
    marker: Mapping[str, Any],
    metadata: Metadata,
    folder: Path,
    world_size: int,
) -> None:
    """Raise a clear ValueError, identically on every rank, before DCP starts collectives."""
    saved_keys = metadata.state_dict_metadata
    saved_entries = marker["entries"]
    missing_entries = [key for key in state if key not in saved_entries]
    if missing_entries:
        raise ValueError(
            f"{folder}: the checkpoint has no entries {missing_entries} (it has {saved_entries})"
        )
    for key, value in state.items():
        if isinstance(value, ModelState):
            _check_tensors(value.tensor_templates(), saved_keys, f"{key}.", folder, key)
        elif isinstance(value, EMAState):
            _check_tensors(
                value.tensor_templates(), saved_keys, f"{key}.{EMA_SHADOW_KEY}.", folder, key
            )
        elif isinstance(value, PerRank):
            saved_ranks = set()
            for saved in saved_keys:
                parts = saved.split(".")
                if (
                    len(parts) > 1
                    and parts[0] == key
                    and (match := _PER_RANK_KEY_RE.match(parts[1]))
                ):
                    saved_ranks.add(int(match.group(1)))
            if saved_ranks != set(range(world_size)):
                raise ValueError(
                    f"{folder}: per-rank entry {key!r} was saved by {len(saved_ranks)} rank(s), "
                    f"this job has {world_size}; per-rank state (e.g. RNG) cannot be resharded: "
                    f"leave {key!r} out of the state to load the rest"
                )


def _check_tensors(
    expected: Mapping[str, torch.Tensor],
    saved: Mapping[str, Any],
    prefix: str,
    folder: Path,
    entry: str,
) -> None:
    saved_shapes = {
        key[len(prefix) :]: tuple(item.size)
        for key, item in saved.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }
    missing = sorted(set(expected) - set(saved_shapes))
    unexpected = sorted(set(saved_shapes) - set(expected))
    # A DTensor's .shape is the global shape, as stored.
    wrong_shape = [
        f"{name}: checkpoint {saved_shapes[name]} vs {tuple(tensor.shape)}"
        for name, tensor in sorted(expected.items())
        if name in saved_shapes and saved_shapes[name] != tuple(tensor.shape)
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {_names(missing)}")
        if unexpected:
            problems.append(f"in the checkpoint but not in the model: {_names(unexpected)}")
        if wrong_shape:
            problems.append(f"shapes differ: {_names(wrong_shape)}")
        raise ValueError(
            f"{folder}: entry {entry!r} does not match the model ({'; '.join(problems)}); "
            "was it saved from a different model config?"
        )


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_KEYS_IN_ERROR])
    more = len(names) - _MAX_KEYS_IN_ERROR
    return f"[{shown}{f', ... ({more} more)' if more > 0 else ''}]"


def _set_nested(root: dict[Any, Any], path: tuple[Any, ...], value: Any) -> None:
    """Set ``root[p0][p1]...[pn] = value``, creating dicts (lists: indices must exist)."""
    node = root
    for part in path[:-1]:
        node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    node[path[-1]] = value


def _write_completion_marker(folder: Path, marker: Mapping[str, Any]) -> None:
    """Write ``COMPLETE``; a step folder counts as a checkpoint only once it exists."""
    write_synced(folder / COMPLETE_MARKER, json.dumps(marker, indent=_JSON_INDENT).encode())


@contextmanager
def _atomic_path(path: Path):
    """Yield a temp path next to ``path``; rename it over ``path`` if the block succeeds."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
