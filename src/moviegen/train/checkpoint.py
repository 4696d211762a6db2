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
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from moviegen.config import atomic_write_text, config_to_dict, fsync_dir

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "COMPLETE_MARKER",
    "CONFIG_METADATA_KEY",
    "Checkpoint",
    "CheckpointManager",
]

# Sub-folder of a run directory that holds the step folders.
CHECKPOINTS_DIRNAME = "checkpoints"
# Step folder names are zero-padded so that they also sort by name.
STEP_DIR_PREFIX = "step_"
STEP_DIGITS = 8
MODEL_FILENAME = "model.safetensors"
EMA_FILENAME = "ema.safetensors"
TRAIN_STATE_FILENAME = "train_state.pt"
METADATA_FILENAME = "metadata.json"
# Written last; a step folder without it is an interrupted save.
COMPLETE_MARKER = "COMPLETE"
# Bumped when the layout changes incompatibly.
FORMAT_VERSION = 1
# Key of ``metadata.json`` under which ``save(config=...)`` stores the resolved config.
CONFIG_METADATA_KEY = "config"
# Default number of complete checkpoints to keep.
DEFAULT_KEEP_LAST = 3
# safetensors header entry that tells readers (e.g. transformers) the tensor framework.
_SAFETENSORS_HEADER = {"format": "pt"}
# Indentation of metadata.json: small, read by people.
_JSON_INDENT = 2

_STEP_DIR_RE = re.compile(rf"^{STEP_DIR_PREFIX}(\d+)$")
# Hidden leftovers of interrupted saves: ".step_00000100.tmp-1234" / ".step_00000100.old-1234".
_LEFTOVER_RE = re.compile(rf"^\.{STEP_DIR_PREFIX}\d+\.(tmp|old)-\d+$")
# Leaf types that ``torch.load(weights_only=True)`` reads back. Exact types for
# scalars: a numpy float64 is a float subclass but would need unpickling.
_SAFE_SCALAR_TYPES = (bool, int, float, str, type(None))
_SAFE_TORCH_TYPES = (torch.Tensor, torch.dtype, torch.device)


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


class CheckpointManager:
    """Saves and finds checkpoints of one run (see the module docstring for the layout).

    Args:
        run_dir: The run's folder; checkpoints go to ``run_dir/checkpoints``.
        keep_last: How many complete checkpoints to keep (the oldest are
            deleted after each save; the one just saved is always kept).
            ``None`` keeps all.
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], *, keep_last: int | None = DEFAULT_KEEP_LAST
    ):
        if keep_last is not None and (isinstance(keep_last, bool) or keep_last < 1):
            raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last!r}")
        self.run_dir = Path(run_dir)
        self.checkpoints_dir = self.run_dir / CHECKPOINTS_DIRNAME
        self.keep_last = keep_last

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
            _check_weights_only_safe(train_state, "train_state")
        metadata_text = _metadata_json(metadata, config)

        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        name = _step_dir_name(step)
        final = self.checkpoints_dir / name
        temp = self.checkpoints_dir / f".{name}.tmp-{os.getpid()}"
        temp.mkdir()
        try:
            sizes = {MODEL_FILENAME: _write_safetensors(model_tensors, temp / MODEL_FILENAME)}
            if ema_tensors is not None:
                sizes[EMA_FILENAME] = _write_safetensors(ema_tensors, temp / EMA_FILENAME)
            if train_state is not None:
                sizes[TRAIN_STATE_FILENAME] = _write_train_state(
                    train_state, temp / TRAIN_STATE_FILENAME
                )
            _write_synced(temp / METADATA_FILENAME, metadata_text.encode())
            marker = {"format_version": FORMAT_VERSION, "step": step, "file_sizes": sizes}
            _write_synced(temp / COMPLETE_MARKER, json.dumps(marker, indent=_JSON_INDENT).encode())
            fsync_dir(temp)
            self._move_into_place(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        fsync_dir(self.checkpoints_dir)
        self._apply_retention(keep=final)
        return final

    def _move_into_place(self, temp: Path, final: Path) -> None:
        if not final.exists():
            os.replace(temp, final)
            return
        # Re-saving a step (e.g. the final save lands on a periodic one): move the
        # old folder aside first, as a folder cannot be renamed over a non-empty one.
        # A crash between the two renames loses only this step; latest() then
        # falls back to the previous checkpoint.
        old = self.checkpoints_dir / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Delete temp folders and step folders without ``COMPLETE`` (interrupted saves)."""
        for entry in self.checkpoints_dir.iterdir():
            if not entry.is_dir():
                continue
            if _LEFTOVER_RE.match(entry.name) or (
                _STEP_DIR_RE.match(entry.name) and not (entry / COMPLETE_MARKER).is_file()
            ):
                shutil.rmtree(entry, ignore_errors=True)

    def _apply_retention(self, *, keep: Path) -> None:
        if self.keep_last is None:
            return
        checkpoints = self.list()
        for path in checkpoints[: max(0, len(checkpoints) - self.keep_last)]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ finding

    def list(self) -> list[Path]:
        """Complete checkpoints of this run, oldest (lowest step) first."""
        return [path for _, path in _complete_checkpoints(self.checkpoints_dir)]

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
        checkpoints = self.list()
        return checkpoints[-1] if checkpoints else None

    @staticmethod
    def resolve(path: str | os.PathLike[str]) -> Path:
        """Find a complete checkpoint folder from a run dir, checkpoints dir or step dir.

        A run dir or checkpoints dir resolves to its latest complete checkpoint.

        Raises:
            FileNotFoundError: ``path`` does not exist, is an incomplete step
                folder, or holds no complete checkpoint.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint at {path}: not a folder")
        if (path / COMPLETE_MARKER).is_file():
            return path
        if _STEP_DIR_RE.match(path.name):
            raise FileNotFoundError(
                f"{path} is an incomplete checkpoint (no {COMPLETE_MARKER} marker: an "
                "interrupted save?)"
            )
        search_dir = path / CHECKPOINTS_DIRNAME if (path / CHECKPOINTS_DIRNAME).is_dir() else path
        checkpoints = _complete_checkpoints(search_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"no complete checkpoint under {search_dir} (expected "
                f"{STEP_DIR_PREFIX}{'N' * STEP_DIGITS}/ folders with a {COMPLETE_MARKER} marker)"
            )
        return checkpoints[-1][1]

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


def _step_dir_name(step: int) -> str:
    return f"{STEP_DIR_PREFIX}{step:0{STEP_DIGITS}d}"


def _complete_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete step folder, sorted by step."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for entry in checkpoints_dir.iterdir():
        match = _STEP_DIR_RE.match(entry.name)
        if match and (entry / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


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


def _check_weights_only_safe(value: Any, key: str) -> None:
    """Raise if ``value`` holds anything ``torch.load(weights_only=True)`` would refuse."""
    kind = type(value)
    if kind in (dict, OrderedDict):
        for name, item in value.items():
            if type(name) not in _SAFE_SCALAR_TYPES:
                raise ValueError(f"{key}: dict key {name!r} of type {type(name).__name__}")
            _check_weights_only_safe(item, f"{key}[{name!r}]")
    elif kind in (list, tuple, torch.Size):
        for index, item in enumerate(value):
            _check_weights_only_safe(item, f"{key}[{index}]")
    elif kind not in _SAFE_SCALAR_TYPES and not isinstance(value, _SAFE_TORCH_TYPES):
        raise ValueError(
            f"{key}: a {kind.__name__} cannot be loaded with torch.load(weights_only=True); "
            "store tensors, numbers, strings, None, lists and dicts (e.g. float(x), x.tolist())"
        )


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


def _write_synced(path: Path, data: bytes) -> int:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    return len(data)


def _fsync_file(path: Path) -> int:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())
    return path.stat().st_size


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """Write and fsync a safetensors file; returns its size in bytes."""
    save_safetensors(tensors, path, metadata=_SAFETENSORS_HEADER)
    return _fsync_file(path)


def _write_train_state(train_state: Mapping[str, Any], path: Path) -> int:
    """Write and fsync ``train_state.pt``; returns its size in bytes."""
    with open(path, "wb") as file:
        torch.save(dict(train_state), file)
        file.flush()
        os.fsync(file.fileno())
    return path.stat().st_size
