"""Typed dataclass configs: strict conversion to and from JSON, CLI overrides.

Every run is described by (nested) keyword-only dataclasses. This module turns
them into plain JSON and back, so that the *resolved* config can be saved next
to every checkpoint and re-read exactly:

* :func:`config_to_dict` -- dataclass -> JSON-ready dict (tuples become lists,
  paths become strings).
* :func:`config_from_dict` -- dict -> dataclass, strictly: unknown keys, missing
  required keys and values of the wrong type are ``ValueError``\\ s that name the
  full dotted key, never silently ignored or coerced.
* :func:`apply_overrides` -- ``["optim.lr=3e-4", "data.sizes=[[64,64]]"]`` ->
  a new config, validated by the same rules.
* :func:`save_config` / :func:`load_config` -- atomic JSON files.

Supported field annotations: ``int``, ``float`` (ints accepted), ``bool``,
``str``, ``Path``, ``X | None`` (and other unions, tried in order),
``Literal[...]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``,
``dict[str, X]``, ``Any`` and nested dataclasses. Modules may use
``from __future__ import annotations``: annotations are resolved with
:func:`typing.get_type_hints`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

__all__ = [
    "apply_overrides",
    "atomic_write_text",
    "config_from_dict",
    "config_to_dict",
    "fsync_dir",
    "load_config",
    "save_config",
]

T = TypeVar("T")

# Indentation of saved config files: meant to be read (and diffed) by people.
JSON_INDENT = 2
# Separator between the key and the value of one command-line override.
OVERRIDE_SEPARATOR = "="


# ----------------------------------------------------------------------------- to dict


def config_to_dict(config: Any) -> dict[str, Any]:
    """Convert a dataclass config (recursively) into JSON-serialisable data.

    Nested dataclasses become dicts, tuples and lists become lists, ``Path``
    becomes ``str``; ``None``, bools, numbers and strings are kept. Only fields
    with ``init=True`` are written, so the result feeds back into
    :func:`config_from_dict` unchanged.
    """
    if not _is_dataclass_instance(config):
        raise TypeError(f"expected a dataclass instance, got {type(config).__name__}")
    return _to_plain(config, "")


def _to_plain(value: Any, key: str) -> Any:
    if _is_dataclass_instance(value):
        return {
            field.name: _to_plain(getattr(value, field.name), _join(key, field.name))
            for field in dataclasses.fields(value)
            if field.init
        }
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_to_plain(item, f"{key}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        if not all(isinstance(name, str) for name in value):
            raise TypeError(f"{key or '<root>'}: dict keys must be strings to be saved as JSON")
        return {name: _to_plain(item, _join(key, name)) for name, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{key or '<root>'}: cannot convert a {type(value).__name__} to JSON; "
        "configs may only hold dataclasses, numbers, strings, bools, paths, None, "
        "tuples, lists and dicts"
    )


# ----------------------------------------------------------------------------- from dict


def config_from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``, validating every value.

    Args:
        cls: A dataclass type. Nested dataclass fields are built recursively.
        data: Field name -> value, e.g. from :func:`config_to_dict` or JSON.
        path: Dotted prefix of ``data`` inside a larger config, used only in
            error messages (``"train.optim"`` makes an unknown key read
            ``train.optim.lrr``).

    Raises:
        ValueError: an unknown key (naming it and the valid keys), a missing
            required key, or a value that does not match its annotation.
            Errors raised by the dataclass's own ``__post_init__`` propagate
            unchanged.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {type(data).__name__}"
        )
    hints = _type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise ValueError(
            f"unknown config key {_join(path, str(unknown[0]))!r} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = _join(path, name)
        if name not in data:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise ValueError(f"missing required config key {key!r} for {cls.__name__}")
            continue
        kwargs[name] = _coerce(data[name], hints[name], key)
    return cls(**kwargs)


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as error:
        raise TypeError(
            f"cannot resolve the annotations of {cls.__name__}: {error}; names used in "
            "annotations must be importable at module level"
        ) from error


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Validate ``value`` against ``annotation`` and convert it (lists -> tuples, ...)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if annotation is Any:
        return value
    if origin is Union or origin is types.UnionType:
        return _coerce_union(value, args, key)
    if origin is Literal:
        # ``True == 1``: compare types too, so Literal[1] does not accept True.
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return choice
        raise ValueError(f"{key}: expected one of {list(args)!r}, got {value!r}")
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping):
            return config_from_dict(annotation, value, path=key)
        raise ValueError(f"{key}: expected a mapping for {annotation.__name__}, got {value!r}")
    if origin is tuple:
        return _coerce_tuple(value, args, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item_type,) = args or (Any,)
        return [_coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        key_type, item_type = args or (Any, Any)
        if key_type is not str and key_type is not Any:
            raise TypeError(f"{key}: only dict[str, ...] config fields are supported")
        for name in value:
            if not isinstance(name, str):
                raise ValueError(f"{key}: dict keys must be strings, got {name!r}")
        return {name: _coerce(item, item_type, _join(key, name)) for name, item in value.items()}
    return _coerce_scalar(value, annotation, key)


def _coerce_union(value: Any, args: tuple[Any, ...], key: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{key}: None is not allowed")
    errors = []
    for option in args:
        if option is type(None):
            continue
        try:
            return _coerce(value, option, key)
        except ValueError as error:
            errors.append(str(error))
    raise ValueError(f"{key}: {value!r} matches none of the allowed types ({'; '.join(errors)})")


def _coerce_tuple(value: Any, args: tuple[Any, ...], key: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key}: expected a list, got {value!r}")
    if not args:  # bare ``tuple``: any items
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
    if len(value) != len(args):
        raise ValueError(f"{key}: expected {len(args)} items, got {len(value)}: {value!r}")
    return tuple(
        _coerce(item, item_type, f"{key}[{i}]")
        for i, (item, item_type) in enumerate(zip(value, args, strict=True))
    )


def _coerce_scalar(value: Any, annotation: Any, key: str) -> Any:
    # bool is a subclass of int: reject it explicitly for numeric fields.
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    elif isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
    else:
        raise TypeError(f"{key}: unsupported config annotation {annotation!r}")
    expected = getattr(annotation, "__name__", repr(annotation))
    raise ValueError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")


# ----------------------------------------------------------------------------- overrides


def apply_overrides(config: T, overrides: Sequence[str]) -> T:
    """Return a copy of ``config`` with ``dotted.key=value`` overrides applied.

    Each value is parsed as JSON when it parses (``3e-4``, ``true``, ``null``,
    ``[[64, 64]]``, ``{"lr": 1e-4}``) and taken as a plain string otherwise
    (``name=foo``). If the JSON value does not fit a field that accepts
    strings, the raw text is used instead, so ``name=123`` sets the string
    ``"123"``. A nested dataclass can be replaced whole with a JSON object,
    which must then list its required keys. Overrides apply in order.

    Raises:
        ValueError: an override without ``=``, an unknown key, or a value of the
            wrong type; the message names the dotted key.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    for override in overrides:
        key, separator, text = override.partition(OVERRIDE_SEPARATOR)
        key = key.strip()
        if not separator or not key:
            raise ValueError(f"override {override!r} must look like 'dotted.key=value'")
        config = _replace_at(config, key.split("."), text, key, "")
    return config


def _replace_at(config: Any, parts: list[str], text: str, full_key: str, prefix: str) -> Any:
    """Replace the field ``parts`` (relative to ``config``, found at ``prefix``)."""
    if not _is_dataclass_instance(config):
        raise ValueError(f"cannot override {full_key!r}: {prefix!r} is not a config section")
    name = parts[0]
    key = _join(prefix, name)
    fields = {field.name for field in dataclasses.fields(config) if field.init}
    if name not in fields:
        where = f" (in override {full_key!r})" if key != full_key else ""
        raise ValueError(
            f"unknown config key {key!r}{where} for {type(config).__name__}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    if len(parts) == 1:
        value = _parse_override_value(text, _type_hints(type(config))[name], full_key)
    else:
        child = getattr(config, name)
        if child is None:
            raise ValueError(
                f"cannot override {full_key!r}: {key!r} is None; set the whole section "
                f"as a JSON object instead, e.g. '{key}={{...}}'"
            )
        value = _replace_at(child, parts[1:], text, full_key, key)
    return dataclasses.replace(config, **{name: value})


def _parse_override_value(text: str, annotation: Any, key: str) -> Any:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return _coerce(text, annotation, key)
    try:
        return _coerce(parsed, annotation, key)
    except ValueError as error:
        if isinstance(parsed, str):
            raise
        try:  # ``name=123`` on a str field means the string "123".
            return _coerce(text, annotation, key)
        except ValueError:
            raise error from None


# ----------------------------------------------------------------------------- files


def save_config(config: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``config`` as indented JSON, atomically (temp file + ``os.replace``)."""
    text = json.dumps(config_to_dict(config), indent=JSON_INDENT) + "\n"
    return atomic_write_text(path, text)


def load_config(cls: type[T], path: str | os.PathLike[str]) -> T:
    """Read a config saved by :func:`save_config`, strictly (see :func:`config_from_dict`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    return config_from_dict(cls, data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half.

    The text goes to a temporary file in the same folder, which is fsynced and
    then renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows
    within one file system); the folder is fsynced so the rename survives a
    power loss where the platform allows it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- helpers


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
