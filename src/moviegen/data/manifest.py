"""JSON Lines manifests: one clip per line.

A line looks like::

    {"path": "clips/000001.mp4", "caption": "a small red circle moving left",
     "fps": 8, "num_frames": 16, "start": 0.0, "end": 2.0,
     "attributes": {"colour": "red"}}

``path`` is relative to the manifest's folder (absolute paths are kept as they
are). ``caption`` is required; ``fps``, ``num_frames``, ``width``, ``height``,
``duration``, ``start`` and ``end`` (seconds) are optional facts about the clip;
``attributes`` is a free JSON object. Any other key is an error, so that a typo
such as ``"captoin"`` is caught instead of silently ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ClipRecord", "ManifestError", "read_manifest", "write_manifest"]


class ManifestError(ValueError):
    """A manifest line is malformed. Names the file, the line and the field."""

    def __init__(self, path: str | os.PathLike, line: int, field_name: str | None, message: str):
        self.path = Path(path)
        self.line = line
        self.field = field_name
        where = f"{self.path}:{line}" + (f" field {field_name!r}" if field_name else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class ClipRecord:
    """One manifest entry. ``path`` is absolute once read from a manifest."""

    path: Path
    caption: str
    fps: float | None = None
    num_frames: int | None = None
    width: int | None = None
    height: int | None = None
    duration: float | None = None
    start: float | None = None
    end: float | None = None
    attributes: dict = field(default_factory=dict)

    def to_json(self, root: Path | None = None) -> str:
        """Serialise with ``path`` relative to ``root`` (when it lies under it)."""
        path = Path(self.path)
        if root is not None:
            try:
                path = path.relative_to(root)
            except ValueError:
                path = path.resolve()
        data: dict = {"path": path.as_posix(), "caption": self.caption}
        for key in _OPTIONAL_NUMBERS:
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.attributes:
            data["attributes"] = self.attributes
        return json.dumps(data, ensure_ascii=False, sort_keys=False)


# Optional numeric fields and the Python type each must have.
_OPTIONAL_NUMBERS: dict[str, type] = {
    "fps": float,
    "num_frames": int,
    "width": int,
    "height": int,
    "duration": float,
    "start": float,
    "end": float,
}
_KNOWN_KEYS = frozenset({"path", "caption", "attributes", *_OPTIONAL_NUMBERS})


def _parse_line(text: str, *, manifest: Path, line: int) -> ClipRecord:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(manifest, line, None, f"invalid JSON: {error.msg}") from error
    if not isinstance(data, dict):
        raise ManifestError(manifest, line, None, "each line must be a JSON object")
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise ManifestError(
            manifest, line, unknown[0], f"unknown key; allowed keys are {sorted(_KNOWN_KEYS)}"
        )
    path = data.get("path")
    if not isinstance(path, str) or not path:
        raise ManifestError(manifest, line, "path", "required, a non-empty string")
    caption = data.get("caption")
    if not isinstance(caption, str):
        raise ManifestError(manifest, line, "caption", "required, a string")
    numbers: dict = {}
    for key, kind in _OPTIONAL_NUMBERS.items():
        value = data.get(key)
        if value is None:
            continue
        # bool is an int subclass in Python; reject it explicitly.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ManifestError(manifest, line, key, f"must be a number, got {value!r}")
        if kind is int and value != int(value):
            raise ManifestError(manifest, line, key, f"must be an integer, got {value!r}")
        if value < 0 or (key in ("fps", "num_frames", "width", "height") and value == 0):
            raise ManifestError(manifest, line, key, f"must be positive, got {value!r}")
        numbers[key] = kind(value)
    if "start" in numbers and "end" in numbers and numbers["end"] <= numbers["start"]:
        raise ManifestError(
            manifest, line, "end", f"must be after start ({numbers['start']}), got {numbers['end']}"
        )
    attributes = data.get("attributes", {})
    if not isinstance(attributes, dict):
        raise ManifestError(manifest, line, "attributes", "must be a JSON object")
    resolved = Path(path) if Path(path).is_absolute() else manifest.parent / path
    return ClipRecord(path=resolved, caption=caption, attributes=attributes, **numbers)


def read_manifest(path: str | os.PathLike) -> list[ClipRecord]:
    """Parse a manifest; blank lines and lines starting with ``#`` are skipped.

    Raises:
        FileNotFoundError: the manifest does not exist.
        ManifestError: a line is malformed (with its line number and field).
    """
    manifest = Path(path).absolute()
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    records = []
    with manifest.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise ManifestError(manifest, line_number, None, "not valid UTF-8") from error
            if not text or text.startswith("#"):
                continue
            records.append(_parse_line(text, manifest=manifest, line=line_number))
    return records


def write_manifest(path: str | os.PathLike, records: Iterable[ClipRecord]) -> Path:
    """Write records as JSON Lines with paths relative to the manifest's folder.

    The file is written to a temporary name and renamed, so readers never see
    a half-written manifest.
    """
    manifest = Path(path).absolute()
    manifest.parent.mkdir(parents=True, exist_ok=True)
    root = manifest.parent
    temporary = manifest.with_name(manifest.name + ".tmp")
    with temporary.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(record.to_json(root) + "\n")
    os.replace(temporary, manifest)
    return manifest
