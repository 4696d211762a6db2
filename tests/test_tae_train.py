"""TAE training: learning, checkpoints, exact resume, stats and the CLI verbs."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch

from moviegen.cli import USAGE_ERROR, main
from moviegen.data.shapes import generate_shapes_dataset, render_dataset_clip
from moviegen.tae.checkpoint import load_tae
from moviegen.tae.model import TAE, TAEConfig, tae_recipe
from moviegen.train.checkpoint import CheckpointManager
from moviegen.train.logging import read_scalars
from moviegen.train.tae_trainer import TAEDataConfig, TAETrainer, content_crop, resolve_config


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(
        out, num_clips=12, size=32, num_frames=8, val_fraction=0.25, seed=1, progress=False
    )
    return out


def debug_config(shapes_data, **changes):
    config = resolve_config(
        "debug", train=str(shapes_data / "train.jsonl"), val=str(shapes_data / "val.jsonl")
    )
    return replace(config, **changes)


def test_overfits_one_short_clip():
    """Loss falls at least 10x when fitting a single clip."""
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    _, frames, _ = render_dataset_clip(3, seed=0, size=32, num_frames=8)
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float()[None] / 127.5 - 1
    model = TAE(TAEConfig(widths=(16, 16, 32, 32), num_res_blocks=1, norm_groups=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        reconstruction, _, _ = model(video, sample=False)
        loss = (reconstruction - video).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < losses[0] / 10, f"{losses[0]:.4f} -> {min(losses[-10:]):.4f}"


def test_training_writes_a_complete_run(shapes_data, tmp_path):
    run = tmp_path / "run"
    logs = TAETrainer(debug_config(shapes_data), run, progress=False).train()
    assert {"val/psnr", "val/ssim", "val/max_zscore"} <= set(logs)
    assert (run / "config.json").is_file()
    assert (run / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in (run / "samples").iterdir()) == [
        "step_00000010.mp4",
        "step_00000020.mp4",
    ]
    scalars = read_scalars(run / "scalars.csv")
    assert [step for step, _ in scalars["loss/total"]] == [5, 10, 15, 20]
    assert "loss/opl" in scalars and "val/psnr" in scalars
    checkpoint = CheckpointManager.load(run)
    assert checkpoint.step == 20
    assert checkpoint.metadata["config"]["model"]["widths"] == [8, 8, 16, 16]
    tae = load_tae(run)
    assert isinstance(tae, TAE) and not tae.training


def budget_run_rates(shapes_data, run, *, fit: bool, budget_s: float, **overrides):
    """Train the debug TAE for 100000 steps under a time budget (which stops
    it long before); the config and the logged learning rate of every step."""
    config = debug_config(
        shapes_data,
        steps=100_000,
        time_budget_s=budget_s,
        fit_schedule_to_budget=fit,
        val_every=100_000,
        checkpoint_every=100_000,
        log_every=1,
        **overrides,
    )
    TAETrainer(config, run, progress=False).train()
    return config, [lr for _, lr in read_scalars(run / "scalars.csv")["train/lr"]]


@pytest.mark.parametrize("fit", [False, True])
def test_schedule_fitted_to_the_time_budget_ends_inside_it(shapes_data, tmp_path, fit):
    # 100000 steps cannot run in 3 s: only the fitted schedule decays.
    config, rates = budget_run_rates(shapes_data, tmp_path / "run", fit=fit, budget_s=3.0)
    assert len(rates) < 100_000  # the budget stopped it
    if fit:
        assert rates[-1] < 0.2 * config.lr  # near the floor (min_lr_ratio 0.05)
        decay = rates[config.warmup_steps :]
        assert all(a >= b for a, b in itertools.pairwise(decay))  # never back up
    else:
        assert rates[-1] > 0.99 * config.lr  # barely past warmup


def test_fitted_schedule_keeps_the_whole_warmup(shapes_data, tmp_path):
    # A 2 s budget for 100000 steps puts the time position far ahead from the
    # first step; the warmup must still ramp step by step, as without fitting.
    rates = {}
    for fit in (False, True):
        config, rates[fit] = budget_run_rates(
            shapes_data, tmp_path / f"fit_{fit}", fit=fit, budget_s=2.0, warmup_steps=6
        )
    assert min(len(rates[False]), len(rates[True])) > 6  # the runs got past the warmup
    assert rates[True][:5] == pytest.approx(rates[False][:5])
    assert all(a < b for a, b in itertools.pairwise(rates[True][:5]))
    assert rates[True][-1] < 0.2 * config.lr  # and the fitted schedule still decays


def test_schedule_fitted_to_an_ample_budget_is_the_plain_schedule(shapes_data, tmp_path):
    # A budget the run fits in never moves the schedule, so the run is as
    # reproducible as one without a budget: same rates, same weights.
    runs = {}
    for fit in (False, True):
        budget = {"time_budget_s": 1000.0, "fit_schedule_to_budget": True} if fit else {}
        config = debug_config(shapes_data, log_every=1, **budget)
        trainer = TAETrainer(config, tmp_path / f"fit_{fit}", progress=False)
        trainer.train()
        rates = [lr for _, lr in read_scalars(tmp_path / f"fit_{fit}" / "scalars.csv")["train/lr"]]
        runs[fit] = (rates, trainer.model.state_dict())
    assert len(runs[True][0]) == 20 and runs[True][0] == runs[False][0]
    for name, value in runs[False][1].items():
        assert torch.equal(runs[True][1][name], value), name


def test_decoder_only_steps_train_the_decoder_on_a_fixed_encoder(shapes_data, tmp_path):
    # The last 8 of 20 steps train the decoder alone.
    config = debug_config(shapes_data, decoder_only_steps=8, log_every=1)
    run = tmp_path / "run"
    trainer = TAETrainer(config, run, progress=False)
    trainer.train(stop_at=12)
    at_12 = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {
        name for name, p in trainer.model.named_parameters() if not torch.equal(p, at_12[name])
    }
    assert changed and all(name.startswith("decoder.") for name in changed)
    flags = read_scalars(run / "scalars.csv")["train/decoder_only"]
    assert [step for step, flag in flags if flag == 1.0] == list(range(13, 21))


def test_decoder_only_pass_decodes_whole_clip_latents_at_the_busiest_window(shapes_data, tmp_path):
    trainer = TAETrainer(debug_config(shapes_data), tmp_path / "run", progress=False)
    video = next(trainer._batches())  # (B, 3, 8, 32, 32); the debug crop is 16 px
    generator = torch.Generator().manual_seed(0)
    target, reconstruction, mean, _ = trainer._decoder_only_pass(video, 0, 0, generator)
    assert target.shape == reconstruction.shape == (*video.shape[:3], 16, 16)
    assert mean.shape[-2:] == (4, 4) and not mean.requires_grad  # whole frames, no autograd
    assert reconstruction.requires_grad
    for clip, window in zip(video, target, strict=True):
        aligned = [
            clip[..., row : row + 16, col : col + 16] for row in (0, 8, 16) for col in (0, 8, 16)
        ]
        assert any(torch.equal(window, crop) for crop in aligned)  # on the 8 px latent grid
        assert float(window.var()) == max(float(crop.var()) for crop in aligned)


def test_decoder_only_phase_follows_a_fitted_schedule(shapes_data, tmp_path):
    # 100000 steps in a 3 s budget: the fitted schedule reaches the decoder-only
    # half long before the steps do; without fitting it never gets there.
    flags = {}
    for fit in (False, True):
        run = tmp_path / f"fit_{fit}"
        budget_run_rates(shapes_data, run, fit=fit, budget_s=3.0, decoder_only_steps=50_000)
        flags[fit] = [flag for _, flag in read_scalars(run / "scalars.csv")["train/decoder_only"]]
    assert set(flags[False]) == {0.0}
    assert flags[True][0] == 0.0 and flags[True][-1] == 1.0


@pytest.mark.parametrize("decoder_only_steps", [0, 8])
def test_resume_is_exact(shapes_data, tmp_path, decoder_only_steps):
    config = debug_config(shapes_data, decoder_only_steps=decoder_only_steps)
    straight = tmp_path / "straight"
    TAETrainer(config, straight, progress=False).train()
    split = tmp_path / "split"
    TAETrainer(config, split, progress=False).train(stop_at=10)
    # A new trainer (as after a crash) picks up the checkpoint at step 10
    # (with 8 decoder-only steps, before the phase that starts at step 12).
    TAETrainer(config, split, progress=False).train()
    first = read_scalars(straight / "scalars.csv")["loss/total"]
    second = read_scalars(split / "scalars.csv")["loss/total"]
    assert first == second
    a, b = CheckpointManager.load(straight), CheckpointManager.load(split)
    for key, tensor in a.model_state.items():
        torch.testing.assert_close(b.model_state[key], tensor, atol=0, rtol=0)


def test_a_run_of_another_architecture_is_refused(shapes_data, tmp_path):
    run = tmp_path / "run"
    TAETrainer(debug_config(shapes_data, steps=10), run, progress=False).train()
    other = replace(debug_config(shapes_data), model=TAEConfig(widths=(8, 8, 8, 8), norm_groups=4))
    with pytest.raises(ValueError, match="another TAE architecture"):
        TAETrainer(other, run, progress=False).train()
    with pytest.raises(ValueError, match="was expected"):
        load_tae(run, expected_config=tae_recipe("cpu"))


def cli(*words) -> int:
    """Run ``moviegen`` with the given words (paths are turned into strings)."""
    return main([str(word) for word in words])


def test_cli_train_stats_reconstruct_eval(shapes_data, tmp_path, capsys):
    run = tmp_path / "run"
    train, val = shapes_data / "train.jsonl", shapes_data / "val.jsonl"
    assert cli("tae", "train", "--recipe", "debug", "--data", train, "--val", val,
               "--out", run, "--steps", 10, "--quiet") == 0  # fmt: skip
    assert "val PSNR" in capsys.readouterr().out

    assert cli("tae", "stats", "--checkpoint", run, "--data", train, "--quiet") == 0
    metadata = json.loads((CheckpointManager.resolve(run) / "metadata.json").read_text())
    stats = metadata["latent_stats"]
    assert len(stats["mean"]) == len(stats["std"]) == 16 and stats["num_clips"] == 9
    tae = load_tae(run)
    assert bool(tae.has_latent_stats)
    torch.testing.assert_close(tae.latent_std, torch.tensor(stats["std"]))

    clip = sorted((shapes_data / "clips").iterdir())[0]
    output = tmp_path / "recon.mp4"
    assert cli("tae", "reconstruct", "--checkpoint", run, "--input", clip,
               "--output", output, "--side-by-side") == 0  # fmt: skip
    assert output.stat().st_size > 0 and "PSNR" in capsys.readouterr().out

    assert cli("tae", "eval", "--checkpoint", run, "--data", val, "--quiet") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["clips"]) == 3
    assert report["psnr"] > 0 and 0 < report["ssim"] <= 1
    assert "max_zscore" in report["latent"]


def test_cli_errors_are_clear(shapes_data, tmp_path, capsys):
    missing = tmp_path / "none"
    assert cli("tae", "eval", "--checkpoint", missing, "--data", shapes_data / "val.jsonl") == (
        USAGE_ERROR
    )
    assert "moviegen: error:" in capsys.readouterr().err
    assert cli("tae", "train", "--recipe", "debug", "--data", shapes_data / "train.jsonl",
               "--out", tmp_path / "r", "--set", "lr=fast") == USAGE_ERROR  # fmt: skip
    assert "lr" in capsys.readouterr().err


def test_content_crops_find_the_object_that_plain_crops_miss():
    clip = -torch.ones(3, 8, 64, 64)  # (C, T, H, W): black, one small bright square
    clip[:, :, 40:48, 8:16] = 1.0

    def object_rate(candidates: int) -> float:
        generator = torch.Generator().manual_seed(0)
        crops = [content_crop(clip, (8, 16, 16), candidates, generator) for _ in range(200)]
        assert all(crop.shape == (3, 8, 16, 16) for crop in crops)
        return sum(bool((crop > 0).any()) for crop in crops) / len(crops)

    plain, content = object_rate(1), object_rate(8)
    assert plain < 0.3, "a 16 px crop of a 64 px frame mostly misses an 8 px object"
    assert content > 0.5 and content > 3 * plain
    with pytest.raises(ValueError, match="crop_candidates"):
        TAEDataConfig(crop_candidates=0)


@pytest.mark.parametrize("decoder_only_steps", [-1, 21])
def test_decoder_only_steps_outside_the_run_are_refused(shapes_data, decoder_only_steps):
    with pytest.raises(ValueError, match=r"decoder_only_steps must be in \[0, steps=20\]"):
        debug_config(shapes_data, decoder_only_steps=decoder_only_steps)
