"""Single-process, atomic, resumable checkpoints.

Layout of one run::

    run_dir/checkpoints/
      step_00000100/
        model.safetensors   model weights (safetensors: no pickle, mmap-able)
        ema.safetensors     optional EMA weights, same keys as the model
        train_state.pt      optional optimizer / scheduler / sampler / RNG / step ...
        metadata.json       resolved config ("config") and any JSON metadata
        COMPLETE            written last: the step, format version, file sizes
      step_00000200/ ...

A save writes everything into a hidden sibling ``.step_00000200.tmp-<pid>``,
fsyncs each file and the folder, and only then renames it to ``step_00000200``
(a rename within one file system is atomic). A crash therefore leaves either
the previous checkpoints untouched plus a hidden temp folder, or a complete new
checkpoint: never a half-written ``step_*`` folder that :meth:`latest` would
pick. Folders without ``COMPLETE`` (e.g. copied by hand, or written by older
code) are ignored as well. Leftovers are deleted by the next :meth:`save`.

``train_state.pt`` is written with ``torch.save`` and read with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects; so
it may only hold tensors, numbers, strings, bools, ``None``, dtypes/devices
and lists, tuples and dicts of them. ``optimizer.state_dict()``,
``LambdaLR.state_dict()`` and :func:`moviegen.train.rng.capture_rng_state`
all qualify; :meth:`CheckpointManager.save` checks this before writing and
names the offending key.

The EMA weights go to ``ema.safetensors`` (loadable into the model like
``model.safetensors``, e.g. for inference); the EMA's update counter belongs in
``train_state`` (``EMA.state_dict()["num_updates"]``).

safetensors cannot store tensors that share memory (tied weights such as an
embedding shared with an output head, or views into one buffer). Such tensors
are cloned before writing, so the file holds independent copies under every
key; ``model.load_state_dict`` then copies the same values into the tied
parameter twice, which is harmless.

The distributed trainer will use DCP instead; this module stays free of
``torch.distributed``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from moviegen.config import atomic_write_text, config_to_dict
from moviegen.train.checkpoint_files import (
    CHECKPOINTS_DIRNAME,
    COMPLETE_MARKER,
    StepFolders,
    check_weights_only_safe,
    fsync_file,
    write_synced,
)

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "COMPLETE_MARKER",
    "CONFIG_METADATA_KEY",
    "Checkpoint",
    "CheckpointManager",
]

MODEL_FILENAME = "model.safetensors"
EMA_FILENAME = "ema.safetensors"
TRAIN_STATE_FILENAME = "train_state.pt"
METADATA_FILENAME = "metadata.json"
# Bumped when the layout changes incompatibly.
FORMAT_VERSION = 1
# Key of ``metadata.json`` under which ``save(config=...)`` stores the resolved config.
CONFIG_METADATA_KEY = "config"
# safetensors header entry that tells readers (e.g. transformers) the tensor framework.
_SAFETENSORS_HEADER = {"format": "pt"}
# Indentation of metadata.json: small, read by people.
_JSON_INDENT = 2


@dataclass(kw_only=True)
class Checkpoint:
    """Everything one checkpoint holds, loaded by :meth:`CheckpointManager.load`."""

    # Training step the checkpoint was taken at.
    step: int
    # The step folder it was read from.
    path: Path
    # Model weights, name -> tensor (as ``model.state_dict()``).
    model_state: dict[str, torch.Tensor]
    # EMA weights with the model's keys, or None when none were saved.
    ema_state: dict[str, torch.Tensor] | None
    # Optimizer / scheduler / sampler / RNG / ... state, or None when none was saved.
    train_state: dict[str, Any] | None
    # Contents of metadata.json (``metadata["config"]`` is the resolved config).
    metadata: dict[str, Any]


class CheckpointManager(StepFolders):
    """Saves and finds checkpoints of one run (see the module docstring for the layout).

    Args:
        run_dir: The run's folder; checkpoints go to ``run_dir/checkpoints``.
        keep_last: How many complete checkpoints to keep (the oldest are
            deleted after each save; the one just saved is always kept).
            ``None`` keeps all.
    """

    HIDDEN_NAMES_WITH_PID = True

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        *,
        model_state: Mapping[str, torch.Tensor],
        train_state: Mapping[str, Any] | None = None,
        ema_state: Mapping[str, torch.Tensor] | None = None,
        metadata: Mapping[str, Any] | None = None,
        config: Any | None = None,
    ) -> Path:
        """Write a complete checkpoint for ``step`` atomically and return its folder.

        Args:
            step: Training step (>= 0); names the folder ``step_{step:08d}``. A
                complete checkpoint of the same step is replaced.
            model_state: ``model.state_dict()``; tensors are copied to CPU.
            train_state: Anything else needed to resume (optimizer, scheduler,
                sampler position, RNG, ...), restricted to types that
                ``torch.load(weights_only=True)`` reads (see module docstring).
            ema_state: ``EMA.shadow_state_dict()``: EMA weights with model keys.
            metadata: JSON-serialisable extras (e.g. latent statistics).
            config: A dataclass config, stored as ``metadata["config"]``.

        Raises:
            ValueError: a negative step, non-tensor weights, a train_state value
                that ``weights_only`` loading would reject, metadata that is not
                JSON, or ``config`` given twice.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        model_tensors = _prepare_tensors(model_state, "model_state")
        ema_tensors = None if ema_state is None else _prepare_tensors(ema_state, "ema_state")
        if train_state is not None:
            check_weights_only_safe(train_state, "train_state")
        metadata_text = _metadata_json(metadata, config)

        final = self._final_dir(step)
        temp = self._temp_dir(final)
        self._start_save(temp)
        try:
            sizes = {MODEL_FILENAME: _write_safetensors(model_tensors, temp / MODEL_FILENAME)}
            if ema_tensors is not None:
                sizes[EMA_FILENAME] = _write_safetensors(ema_tensors, temp / EMA_FILENAME)
            if train_state is not None:
                sizes[TRAIN_STATE_FILENAME] = _write_train_state(
                    train_state, temp / TRAIN_STATE_FILENAME
                )
            write_synced(temp / METADATA_FILENAME, metadata_text.encode())
            marker = {"format_version": FORMAT_VERSION, "step": step, "file_sizes": sizes}
            write_synced(temp / COMPLETE_MARKER, json.dumps(marker, indent=_JSON_INDENT).encode())
            self._publish(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return final

    # list(), latest() and resolve() come from StepFolders.

    # ------------------------------------------------------------------ loading

    @staticmethod
    def load(
        path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
    ) -> Checkpoint:
        """Load a checkpoint; ``path`` is anything :meth:`resolve` accepts.

        Tensors are placed on ``map_location``. ``train_state.pt`` is read with
        ``torch.load(weights_only=True)``.

        Raises:
            FileNotFoundError: see :meth:`resolve`.
            ValueError: a newer format version, or a file whose size differs
                from the one recorded at save time (a damaged copy).
        """
        folder = CheckpointManager.resolve(path)
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
        version = marker.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{folder}: checkpoint format version {version!r}, this code reads {FORMAT_VERSION}"
            )
        for filename, size in marker["file_sizes"].items():
            actual = (folder / filename).stat().st_size if (folder / filename).is_file() else None
            if actual != size:
                raise ValueError(
                    f"{folder / filename}: expected {size} bytes, found {actual}; the "
                    "checkpoint is damaged (truncated copy?)"
                )
        device = str(map_location)
        ema_path = folder / EMA_FILENAME
        train_state_path = folder / TRAIN_STATE_FILENAME
        return Checkpoint(
            step=int(marker["step"]),
            path=folder,
            model_state=load_safetensors(folder / MODEL_FILENAME, device=device),
            ema_state=load_safetensors(ema_path, device=device) if ema_path.is_file() else None,
            train_state=(
                torch.load(train_state_path, map_location=map_location, weights_only=True)
                if train_state_path.is_file()
                else None
            ),
            metadata=json.loads((folder / METADATA_FILENAME).read_text()),
        )

    @staticmethod
    def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
        """Only the ``metadata.json`` of a checkpoint (no tensors are read)."""
        folder = CheckpointManager.resolve(path)
        return json.loads((folder / METADATA_FILENAME).read_text())

    @staticmethod
    def update_metadata(path: str | os.PathLike[str], updates: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``updates`` into a checkpoint's ``metadata.json`` (top-level keys) atomically.

        Used for values computed after training, e.g. the TAE's latent mean/std.
        ``path`` is anything :meth:`resolve` accepts. Returns the new metadata.
        """
        folder = CheckpointManager.resolve(path)
        metadata_path = folder / METADATA_FILENAME
        merged = {**json.loads(metadata_path.read_text()), **updates}
        atomic_write_text(metadata_path, _metadata_json(merged, None))
        return merged


# ----------------------------------------------------------------------------- helpers


def _prepare_tensors(state: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} must be a mapping name -> tensor, got {type(state).__name__}")
    prepared = {}
    seen_storages: set[int] = set()
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"{what}[{name!r}]: expected str -> Tensor, got {type(tensor).__name__}; put "
                "non-tensor state in train_state or metadata"
            )
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage()
        shares_memory = storage.data_ptr() in seen_storages and tensor.numel() > 0
        # Views into a larger buffer would also drag the whole buffer along.
        if shares_memory or not tensor.is_contiguous() or storage.nbytes() != tensor.nbytes:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen_storages.add(tensor.untyped_storage().data_ptr())
        prepared[name] = tensor
    return prepared


def _metadata_json(metadata: Mapping[str, Any] | None, config: Any | None) -> str:
    data = dict(metadata or {})
    if config is not None:
        if CONFIG_METADATA_KEY in data:
            raise ValueError(
                f"config given twice: as config= and as metadata[{CONFIG_METADATA_KEY!r}]"
            )
        if not dataclasses.is_dataclass(config):
            raise ValueError(f"config must be a dataclass instance, got {type(config).__name__}")
        data[CONFIG_METADATA_KEY] = config_to_dict(config)
    try:
        # allow_nan=False: NaN/Infinity are not JSON and other readers choke on them.
        return json.dumps(data, indent=_JSON_INDENT, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {error}") from error


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """Write and fsync a safetensors file; returns its size in bytes."""
    save_safetensors(tensors, path, metadata=_SAFETENSORS_HEADER)
    return fsync_file(path)


def _write_train_state(train_state: Mapping[str, Any], path: Path) -> int:
    """Write and fsync ``train_state.pt``; returns its size in bytes."""
    with open(path, "wb") as file:
        torch.save(dict(train_state), file)
        file.flush()
        os.fsync(file.fileno())
    return path.stat().st_size
