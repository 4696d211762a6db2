"""Strict dataclass configs: dict round trip, unknown keys, types, CLI overrides, files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from moviegen.config import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    # Peak learning rate.
    lr: float = 1e-4
    # Adam betas.
    betas: tuple[float, float] = (0.9, 0.95)
    # Learning-rate schedule.
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    # (height, width) buckets.
    sizes: tuple[tuple[int, int], ...] = ((64, 64),)
    # Allowed clip lengths.
    frame_counts: tuple[int, ...] = (8, 16)
    # Dataset manifest, if any.
    manifest: Path | None = None


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    # Run name (required: no default).
    name: str
    # Number of optimizer steps.
    steps: int = 10
    # Use EMA weights.
    use_ema: bool = True
    # Output folder.
    out_dir: Path = Path("runs/x")
    # Optional seed.
    seed: int | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)


def full_config() -> RunConfig:
    return RunConfig(
        name="tiny",
        steps=7,
        use_ema=False,
        out_dir=Path("/tmp/run"),
        seed=3,
        optim=OptimConfig(lr=3e-4, betas=(0.8, 0.99), schedule="constant"),
        data=DataConfig(
            sizes=((48, 80), (64, 64)), frame_counts=(4,), manifest=Path("data/m.jsonl")
        ),
    )


def test_round_trip_dict_config_dict():
    config = full_config()
    data = config_to_dict(config)
    # JSON-ready: tuples are lists, paths are strings.
    assert data["data"]["sizes"] == [[48, 80], [64, 64]]
    assert data["out_dir"] == "/tmp/run"
    assert json.loads(json.dumps(data)) == data
    rebuilt = config_from_dict(RunConfig, data)
    assert rebuilt == config
    assert isinstance(rebuilt.data.sizes[0], tuple)
    assert isinstance(rebuilt.data.manifest, Path)
    assert config_to_dict(rebuilt) == data


def test_defaults_fill_missing_keys_and_int_is_accepted_for_float():
    config = config_from_dict(RunConfig, {"name": "a", "optim": {"lr": 1}})
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.data == DataConfig()


def test_missing_required_key():
    with pytest.raises(ValueError, match="'name'"):
        config_from_dict(RunConfig, {"steps": 3})


def test_unknown_key_names_dotted_path_and_valid_keys():
    with pytest.raises(ValueError, match=r"'optim\.lrr'.*valid keys: betas, lr, schedule"):
        config_from_dict(RunConfig, {"name": "a", "optim": {"lrr": 1e-3}})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"name": "a", "steps": "10"}, "steps"),
        ({"name": "a", "steps": 1.5}, "steps"),
        ({"name": "a", "steps": True}, "steps"),
        ({"name": "a", "use_ema": 1}, "use_ema"),
        ({"name": 5}, "name"),
        ({"name": "a", "optim": {"schedule": "linear"}}, r"optim\.schedule"),
        ({"name": "a", "optim": {"betas": [0.9]}}, r"optim\.betas"),
        ({"name": "a", "data": {"sizes": [[64, 64, 3]]}}, r"data\.sizes\[0\]"),
        ({"name": "a", "data": {"frame_counts": [8, "x"]}}, r"data\.frame_counts\[1\]"),
        ({"name": "a", "optim": 3}, "optim"),
        ({"name": "a", "out_dir": None}, "out_dir"),
    ],
)
def test_wrong_type_names_the_key(data, key):
    with pytest.raises(ValueError, match=key):
        config_from_dict(RunConfig, data)


def test_overrides_numbers_lists_strings_null_nested():
    config = config_from_dict(RunConfig, {"name": "a", "seed": 1})
    new = apply_overrides(
        config,
        [
            "steps=20",
            "optim.lr=3e-4",
            "optim.schedule=constant",
            "data.sizes=[[48,80],[64,64]]",
            "seed=null",
            "name=123",  # not JSON-compatible with str: taken as text
            "out_dir=/tmp/elsewhere",
            "use_ema=false",
        ],
    )
    assert new.steps == 20
    assert new.optim.lr == pytest.approx(3e-4)
    assert new.optim.schedule == "constant"
    assert new.data.sizes == ((48, 80), (64, 64))
    assert new.seed is None
    assert new.name == "123"
    assert new.out_dir == Path("/tmp/elsewhere")
    assert new.use_ema is False
    # The input is not modified; untouched sections are kept.
    assert config.steps == 10 and config.seed == 1
    assert new.optim.betas == config.optim.betas


def test_override_whole_section_with_json_object():
    config = config_from_dict(RunConfig, {"name": "a"})
    new = apply_overrides(config, ['optim={"lr": 0.5}'])
    assert new.optim == OptimConfig(lr=0.5)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optim.lrr=1", r"optim\.lrr"),
        ("nope=1", "nope"),
        ("steps.inner=1", r"steps\.inner"),
        ("steps=abc", "steps"),
        ("optim.schedule=linear", r"optim\.schedule"),
        ("steps", "key=value"),
        ("=3", "key=value"),
    ],
)
def test_bad_overrides(override, match):
    config = config_from_dict(RunConfig, {"name": "a"})
    with pytest.raises(ValueError, match=match):
        apply_overrides(config, [override])


def test_save_and_load_config_file(tmp_path):
    config = full_config()
    path = save_config(config, tmp_path / "sub" / "config.json")
    assert load_config(RunConfig, path) == config
    assert not [p for p in path.parent.iterdir() if p.name != "config.json"]  # no temp files
    data = json.loads(path.read_text())
    data["extra"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="extra"):
        load_config(RunConfig, path)
