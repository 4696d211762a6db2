"""`make demo` end to end at test size: every stage runs, writes its outputs, and is reused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moviegen.cli import USAGE_ERROR, main
from moviegen.data.manifest import read_manifest
from moviegen.data.shapes import ShapeAttributes, canonical_captions, render_dataset_clip
from moviegen.data.video_io import read_video
from moviegen.pipeline.demo import DemoConfig, run_demo, spread_indices


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_finished_ones(tmp_path):
    config = DemoConfig(
        out=tmp_path / "demo",
        num_clips=12,
        size=32,
        num_frames=8,
        val_fraction=0.25,
        tae_recipe="debug",
        stats_clips=8,
        t2v_recipe="debug",
        t2v_time_budget_s=100.0,
        t2v_steps=3,  # the step counts, not the budgets, end these runs
        tae_steps=12,  # past the debug recipe's val_every (10)
        tae_time_budget_s=60.0,
        training_budget_s=80.0,  # the transformer gets 80 s minus the TAE's seconds
        sample_steps=2,
    )
    lines: list[str] = []
    outputs = run_demo(config, log=lines.append)
    for name in (
        "shapes contact sheet",
        "TAE reconstruction",
        "samples contact sheet",
        "samples gif",
    ):
        assert outputs[name].is_file(), name
    prompts = (outputs["samples"] / "prompts.jsonl").read_text().splitlines()
    assert len(prompts) == 144
    # The clips are lossless: every run trains on exactly the rendered pixels.
    first = read_manifest(config.out / "data" / "shapes" / "train.jsonl")[0]
    index = int(Path(first.path).stem)
    assert Path(first.path).suffix == ".mkv"
    _, rendered, _ = render_dataset_clip(index, seed=config.seed, size=32, num_frames=8)
    np.testing.assert_array_equal(read_video(first.path), rendered)
    summary = json.loads((config.out / "summary.json").read_text())
    assert set(summary["score"]["accuracy"]) == {"colour", "shape", "size", "direction"}
    assert 0.0 <= summary["score"]["all_correct_rate"] <= 1.0
    assert len(summary["timings_s"]) == 9
    assert any("prompt adherence on 144 captions" in line for line in lines)
    tae_config = json.loads((config.out / "tae" / "config.json").read_text())
    assert tae_config["data"]["size"] == 32
    assert tae_config["steps"] == 12
    # The demo validates its TAE once, at the end (validations cost budget).
    scalars = (config.out / "tae" / "scalars.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in scalars if ",val/psnr," in line] == ["12"]
    t2v_config = json.loads((config.out / "t2v" / "config.json").read_text())
    assert t2v_config["steps"] == 3
    tae_stamp = json.loads((config.out / "tae" / "demo_stage.json").read_text())
    tae_seconds = tae_stamp["result"]["train_seconds"]
    assert 0 < tae_seconds < 20
    assert t2v_config["time_budget_s"] == pytest.approx(80.0 - tae_seconds)
    assert (config.out / "t2v" / "checkpoints" / "step_00000003").is_dir()

    again: list[str] = []
    run_demo(config, log=again.append)
    reused = [line for line in again if "reusing" in line]
    assert len(reused) == 5  # data, TAE, precompute, transformer, samples

    # New transformer steps retrain the transformer on the same latents.
    third: list[str] = []
    run_demo(replace(config, t2v_steps=4), log=third.append)
    reused = {line.split("] ")[1].split(":")[0] for line in third if "reusing" in line}
    assert reused == {"shapes dataset", "TAE training + latent stats", "precompute"}

    # A new guidance interval samples again from the same transformer.
    fourth: list[str] = []
    run_demo(replace(config, t2v_steps=4, cfg_interval=(0.0, 0.5)), log=fourth.append)
    reused = {line.split("] ")[1].split(":")[0] for line in fourth if "reusing" in line}
    assert reused == {
        "shapes dataset",
        "TAE training + latent stats",
        "precompute",
        "transformer training",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("training_budget_s", 0.0),
        ("tae_time_budget_s", 0.0),
        ("t2v_time_budget_s", -1.0),
        ("tae_steps", 0),
        ("t2v_steps", -5),
        ("sample_steps", 0),
        ("cfg_scale", 0.0),
        ("sample_eta", 1.5),
    ],
)
def test_demo_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DemoConfig(**{field: value})


def test_transformer_budget_is_what_the_tae_left_up_to_its_own():
    config = DemoConfig(training_budget_s=750.0, tae_time_budget_s=330.0, t2v_time_budget_s=460.0)
    assert config.t2v_budget_s(280.0) == 460.0  # a TAE at the usual speed leaves it all
    assert config.t2v_budget_s(320.0) == 430.0  # a slow TAE's extra time comes off it
    with pytest.raises(ValueError, match="left none"):
        replace(config, training_budget_s=340.0).t2v_budget_s(345.0)
    with pytest.raises(ValueError, match="must exceed tae_time_budget_s"):
        DemoConfig(training_budget_s=300.0, tae_time_budget_s=330.0)


def test_contact_sheet_rows_show_every_shape_and_direction():
    captions = canonical_captions()
    picks = spread_indices(len(captions), 12)
    assert len(picks) == 12 and picks[0] == 0 and picks[-1] == len(captions) - 1
    chosen = [ShapeAttributes.from_caption(captions[index]) for index in picks]
    assert {attributes.shape for attributes in chosen} == {"circle", "square", "triangle"}
    assert {attributes.direction for attributes in chosen} == {"left", "right", "up", "down"}
    assert {attributes.size for attributes in chosen} == {"small", "large"}
    assert len({attributes.colour for attributes in chosen}) == 6
    assert spread_indices(5, 12) == [0, 1, 2, 3, 4]
    assert spread_indices(7, 1) == [0] and spread_indices(0, 3) == []


def test_demo_config_rejects_a_bad_guidance_interval():
    with pytest.raises(ValueError, match="guidance interval"):
        DemoConfig(cfg_interval=(0.7, 0.2))


def test_cli_demo_reports_bad_options_before_doing_anything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--t2v-steps", "0"]) == USAGE_ERROR
    assert "t2v_steps must be at least 1" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--cfg-interval", "0.9", "0.1"]) == USAGE_ERROR
    assert "guidance interval" in capsys.readouterr().err
    assert not out.exists()


def test_cli_demo_writes_lossless_clips_unless_asked_for_h264(monkeypatch, tmp_path):
    import moviegen.pipeline.demo as demo_module

    seen: list[DemoConfig] = []
    monkeypatch.setattr(demo_module, "run_demo", seen.append)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert main(["demo", "--out", str(tmp_path), "--h264-data"]) == 0
    assert [config.lossless_data for config in seen] == [True, False]


def test_cli_demo_help_states_the_real_defaults(capsys):
    from moviegen.train.t2v_trainer import t2v_train_recipe
    from moviegen.train.tae_trainer import tae_train_recipe

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = DemoConfig()
    for stated in (
        f"TAE + transformer training seconds (default {defaults.training_budget_s:g})",
        f"TAE training seconds, at most (default {defaults.tae_time_budget_s:g})",
        f"(default: the recipe's {tae_train_recipe(defaults.tae_recipe).steps})",
        f"transformer training seconds, at most (default {defaults.t2v_time_budget_s:g})",
        f"transformer steps (default: the recipe's {t2v_train_recipe(defaults.t2v_recipe).steps})",
        f"solver steps per video (default {defaults.sample_steps})",
        f"guidance scale (default {defaults.cfg_scale:g})",
        f"share of fresh noise (default {defaults.sample_eta:g})",
    ):
        assert stated in text


def test_demo_sampling_options_follow_the_config_and_take_changes():
    from moviegen.pipeline.demo import DemoConfig

    config = DemoConfig(size=32, num_frames=8, sample_steps=12, cfg_scale=2.0, sample_eta=0.25)
    options = config.sampling_options()
    assert (options.height, options.width, options.num_frames) == (32, 32, 8)
    assert (options.steps, options.cfg_scale, options.fps) == (12, 2.0, config.fps)
    assert options.eta == 0.25 and options.solver == "euler"
    changed = config.sampling_options(steps=50, cfg_interval=(0.5, 1.0))
    assert (changed.steps, changed.cfg_interval, changed.cfg_scale) == (50, (0.5, 1.0), 2.0)
