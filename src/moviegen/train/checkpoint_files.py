"""The step folders of a run's checkpoints, shared by both checkpointers.

:class:`moviegen.train.checkpoint.CheckpointManager` (one process,
safetensors) and :class:`moviegen.distributed.checkpoint.DistributedCheckpointer`
(DCP) lay out a run alike::

    run_dir/checkpoints/
      step_00000100/      complete: holds the COMPLETE marker, written last
      step_00000200/
      .step_00000300.tmp  hidden temp folder of a save in progress (or interrupted)

What they share lives here: step folder names, finding complete checkpoints,
moving a finished temp folder into place, deleting leftovers of interrupted
saves, keep-last-k retention (:class:`StepFolders`, their base class), fsynced
writes, and the check that state can be read back with
``torch.load(weights_only=True)``. Only the hidden folders' names differ: see
:attr:`StepFolders.HIDDEN_NAMES_WITH_PID`.

This module stays free of ``torch.distributed``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import torch

from moviegen.config import fsync_dir

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "COMPLETE_MARKER",
    "DEFAULT_KEEP_LAST",
    "STEP_DIGITS",
    "STEP_DIR_PREFIX",
    "STEP_DIR_RE",
    "StepFolders",
    "check_weights_only_safe",
    "complete_checkpoints",
    "fsync_file",
    "step_dir_name",
    "write_synced",
]

# Sub-folder of a run directory that holds the step folders.
CHECKPOINTS_DIRNAME = "checkpoints"
# Step folder names are zero-padded so that they also sort by name.
STEP_DIR_PREFIX = "step_"
STEP_DIGITS = 8
STEP_DIR_RE = re.compile(rf"^{STEP_DIR_PREFIX}(\d+)$")
# Written last; a step folder without it is an interrupted save.
COMPLETE_MARKER = "COMPLETE"
# Default number of complete checkpoints to keep.
DEFAULT_KEEP_LAST = 3
# Tags of the hidden folders: a save in progress, and a step folder being replaced.
TEMP_TAG = "tmp"
OLD_TAG = "old"
# Leaf types that ``torch.load(weights_only=True)`` reads back. Exact types for
# scalars: a numpy float64 is a float subclass but would need unpickling.
_SAFE_SCALAR_TYPES = (bool, int, float, str, type(None))
_SAFE_TORCH_TYPES = (torch.Tensor, torch.dtype, torch.device)


def step_dir_name(step: int) -> str:
    """``step_00000100`` for step 100."""
    return f"{STEP_DIR_PREFIX}{step:0{STEP_DIGITS}d}"


def _hidden_dir_re(suffix_pattern: str) -> re.Pattern[str]:
    """Names of hidden temp / old folders: ``.step_N.tmp<suffix>``, ``.step_N.old<suffix>``."""
    return re.compile(rf"^\.{STEP_DIR_PREFIX}\d+\.({TEMP_TAG}|{OLD_TAG}){suffix_pattern}$")


# Leftovers of interrupted saves: ".step_00000100.tmp-1234" (a writer's pid) or ".step_00000100.tmp".
_PID_LEFTOVER_RE = _hidden_dir_re(r"-\d+")
_SHARED_LEFTOVER_RE = _hidden_dir_re("")


def complete_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete step folder, sorted by step."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for entry in checkpoints_dir.iterdir():
        match = STEP_DIR_RE.match(entry.name)
        if match and (entry / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


class StepFolders:
    """The step folders of one run: listing, atomic publication, cleanup and retention.

    Base class of both checkpointers. A save writes into :meth:`_temp_dir`
    (made by :meth:`_start_save`, which first deletes leftovers of interrupted
    saves), writes ``COMPLETE`` last and hands the folder to :meth:`_publish`.
    Subclasses set :attr:`HIDDEN_NAMES_WITH_PID`.

    Args:
        run_dir: The run's folder; checkpoints go to ``run_dir/checkpoints``.
        keep_last: How many complete checkpoints to keep (the oldest are
            deleted after each save; the one just saved is always kept).
            ``None`` keeps all.
    """

    # Whether the hidden temp / old folders carry the writer's pid
    # (".step_00000100.tmp-1234"): True for a single writer; False where all
    # ranks of a distributed save must agree on the name (".step_00000100.tmp").
    HIDDEN_NAMES_WITH_PID: ClassVar[bool]

    def __init__(
        self, run_dir: str | os.PathLike[str], *, keep_last: int | None = DEFAULT_KEEP_LAST
    ):
        if keep_last is not None and (
            isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        ):
            raise ValueError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
        self.run_dir = Path(run_dir)
        self.checkpoints_dir = self.run_dir / CHECKPOINTS_DIRNAME
        self.keep_last = keep_last

    # ------------------------------------------------------------------ finding

    def list(self) -> list[Path]:
        """Complete checkpoints of this run, oldest (lowest step) first."""
        return [path for _, path in complete_checkpoints(self.checkpoints_dir)]

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
        checkpoints = self.list()
        return checkpoints[-1] if checkpoints else None

    @classmethod
    def resolve(cls, path: str | os.PathLike[str]) -> Path:
        """Find a complete checkpoint folder from a run dir, checkpoints dir or step dir.

        A run dir or checkpoints dir resolves to its newest complete checkpoint.

        Raises:
            FileNotFoundError: ``path`` does not exist, is an incomplete step
                folder (or a hidden temp folder), or holds no complete checkpoint.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint at {path}: not a folder")
        if (path / COMPLETE_MARKER).is_file():
            return path
        if STEP_DIR_RE.match(path.name) or cls._leftover_re().match(path.name):
            raise FileNotFoundError(
                f"{path} is an incomplete checkpoint (no {COMPLETE_MARKER} marker: an "
                "interrupted save?)"
            )
        search_dir = path / CHECKPOINTS_DIRNAME if (path / CHECKPOINTS_DIRNAME).is_dir() else path
        checkpoints = complete_checkpoints(search_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"no complete checkpoint under {search_dir} (expected "
                f"{STEP_DIR_PREFIX}{'N' * STEP_DIGITS}/ folders with a {COMPLETE_MARKER} marker)"
            )
        return checkpoints[-1][1]

    # ------------------------------------------------------------------ saving

    @classmethod
    def _leftover_re(cls) -> re.Pattern[str]:
        return _PID_LEFTOVER_RE if cls.HIDDEN_NAMES_WITH_PID else _SHARED_LEFTOVER_RE

    def _hidden_dir(self, final: Path, tag: str) -> Path:
        suffix = f"-{os.getpid()}" if self.HIDDEN_NAMES_WITH_PID else ""
        return self.checkpoints_dir / f".{final.name}.{tag}{suffix}"

    def _final_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_dir_name(step)

    def _temp_dir(self, final: Path) -> Path:
        return self._hidden_dir(final, TEMP_TAG)

    def _start_save(self, temp: Path) -> None:
        """Create the checkpoints dir, delete leftovers of interrupted saves, create ``temp``."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        temp.mkdir()

    def _publish(self, temp: Path, final: Path) -> None:
        """Make a complete temp folder the step folder ``final``, then apply retention."""
        fsync_dir(temp)
        self._move_into_place(temp, final)
        fsync_dir(self.checkpoints_dir)
        self._apply_retention(keep=final)

    def _move_into_place(self, temp: Path, final: Path) -> None:
        if not final.exists():
            os.replace(temp, final)
            return
        # Re-saving a step (e.g. the final save lands on a periodic one): move the
        # old folder aside first, as a folder cannot be renamed over a non-empty one.
        # A crash between the two renames loses only this step; latest() then
        # falls back to the previous checkpoint.
        old = self._hidden_dir(final, OLD_TAG)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Delete hidden temp/old folders and step folders without ``COMPLETE``."""
        for entry in self.checkpoints_dir.iterdir():
            if not entry.is_dir():
                continue
            if self._leftover_re().match(entry.name) or (
                STEP_DIR_RE.match(entry.name) and not (entry / COMPLETE_MARKER).is_file()
            ):
                shutil.rmtree(entry, ignore_errors=True)

    def _apply_retention(self, *, keep: Path) -> None:
        if self.keep_last is None:
            return
        checkpoints = self.list()
        for path in checkpoints[: max(0, len(checkpoints) - self.keep_last)]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- files


def write_synced(path: Path, data: bytes) -> int:
    """Write ``data`` to ``path`` and fsync it; returns its size in bytes."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    return len(data)


def fsync_file(path: Path) -> int:
    """Fsync a file written by someone else (e.g. safetensors); returns its size in bytes."""
    with open(path, "rb+") as file:
        os.fsync(file.fileno())
    return path.stat().st_size


def check_weights_only_safe(value: Any, key: str) -> None:
    """Raise if ``value`` holds anything ``torch.load(weights_only=True)`` would refuse.

    Allowed: tensors, dtypes, devices, bools, ints, floats, strings, ``None``,
    and lists, tuples, ``torch.Size`` and dicts of them.

    Args:
        value: The state to check, e.g. ``optimizer.state_dict()``.
        key: Its name in error messages; nested keys are appended (``key['opt'][0]``).

    Raises:
        ValueError: naming the first offending key and type.
    """
    kind = type(value)
    if kind in (dict, OrderedDict):
        for name, item in value.items():
            if type(name) not in _SAFE_SCALAR_TYPES:
                raise ValueError(f"{key}: dict key {name!r} of type {type(name).__name__}")
            check_weights_only_safe(item, f"{key}[{name!r}]")
    elif kind in (list, tuple, torch.Size):
        for index, item in enumerate(value):
            check_weights_only_safe(item, f"{key}[{index}]")
    elif kind not in _SAFE_SCALAR_TYPES and not isinstance(value, _SAFE_TORCH_TYPES):
        raise ValueError(
            f"{key}: a {kind.__name__} cannot be loaded with torch.load(weights_only=True); "
            "store tensors, numbers, strings, None, lists and dicts (e.g. float(x), x.tolist())"
        )
