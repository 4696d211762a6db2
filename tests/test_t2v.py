"""Text-to-video: precompute shards, the transformer trainer, sampling and their CLI verbs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import save_random_tae_run
from moviegen.cli import USAGE_ERROR, main
from moviegen.config import config_to_dict
from moviegen.data.precompute import (
    LatentDataset,
    PrecomputeConfig,
    concat_text_features,
    precompute,
)
from moviegen.data.shapes import generate_shapes_dataset
from moviegen.pipeline.sample import (
    SamplingOptions,
    TextToVideoPipeline,
    latent_shape_for,
    load_t2v,
    read_prompts_file,
    sample_to_folder,
)
from moviegen.tae.checkpoint import TAE_KIND
from moviegen.tae.model import TAE, tae_recipe
from moviegen.text import TextEncoderConfig
from moviegen.train.checkpoint import CheckpointManager
from moviegen.train.logging import read_scalars
from moviegen.train.t2v_trainer import T2VTrainer, resolve_t2v_config
from moviegen.transformer import transformer_recipe

TINY_TEXT = [TextEncoderConfig(name="tiny", kind="tiny", max_length=64, dim=16, num_layers=1)]
SIZE, FRAMES = 32, 8


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(
        out, num_clips=12, size=SIZE, num_frames=FRAMES, val_fraction=0.25, seed=3, progress=False
    )
    return out


@pytest.fixture(scope="module")
def tae_run(tmp_path_factory, shapes_data):
    """A random debug TAE saved as a run, with latent statistics."""
    return save_random_tae_run(tmp_path_factory.mktemp("tae"), shapes_data / "train.jsonl")


@pytest.fixture(scope="module")
def latents(tmp_path_factory, shapes_data, tae_run):
    out = tmp_path_factory.mktemp("latents")
    config = PrecomputeConfig(
        tae=str(tae_run),
        data=str(shapes_data / "train.jsonl"),
        size=SIZE,
        num_frames=FRAMES,
        fps=8,
        shard_size=4,
    )
    precompute(config, out, text_encoders=TINY_TEXT, progress=False)
    return out


def t2v_config(latents, **changes):
    return replace(resolve_t2v_config("debug", latents=str(latents)), **changes)


@pytest.fixture(scope="module")
def t2v_run(tmp_path_factory, latents):
    run = tmp_path_factory.mktemp("t2v")
    T2VTrainer(t2v_config(latents), run, progress=False).train()
    return run


# ----------------------------------------------------------------------------- precompute


def test_precompute_shards_hold_every_clip(latents, shapes_data):
    dataset = LatentDataset(latents)
    num_train = len((shapes_data / "train.jsonl").read_text().splitlines())
    assert len(dataset) == num_train and dataset.skips.total == 0
    assert len(list(latents.glob("shard_*.safetensors"))) == -(-num_train // 4)
    sample = dataset[0]
    assert sample["latent"].shape == (16, 1, SIZE // 8, SIZE // 8)
    assert sample["caption"].startswith("FPS-8 a ")
    hidden, mask = sample["text"]["tiny"]
    assert hidden.shape[1] == 16 and bool(mask.all())  # trimmed to real tokens
    assert set(dataset.bucket_keys()) == {(1, SIZE // 8, SIZE // 8)}
    meta = dataset.meta
    assert meta["latent_stats"] is not None and meta["text_dims"] == {"tiny": 16}


def test_precompute_latents_are_the_normalised_tae_encoding(latents, tae_run, shapes_data):
    from moviegen.data.transforms import frames_to_tensor
    from moviegen.data.video_io import read_video
    from moviegen.tae.checkpoint import load_tae

    dataset = LatentDataset(latents)
    tae = load_tae(tae_run)
    first = json.loads((shapes_data / "train.jsonl").read_text().splitlines()[0])
    video = frames_to_tensor(read_video(shapes_data / first["path"]))[None]
    expected = tae.encode(video)[0]
    # Precompute encodes clips in batches; batched convolutions sum in another
    # order than a batch of one, hence the fp32 tolerance.
    torch.testing.assert_close(dataset[0]["latent"], expected, rtol=1e-4, atol=1e-4)


def test_precompute_resumes_and_refuses_other_settings(latents, tae_run, shapes_data, tmp_path):
    config = PrecomputeConfig(
        tae=str(tae_run),
        data=str(shapes_data / "train.jsonl"),
        size=SIZE,
        num_frames=FRAMES,
        fps=8,
        shard_size=4,
    )
    out = tmp_path / "copy"
    precompute(config, out, text_encoders=TINY_TEXT, progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("shard_*")}
    # An interrupted run: the last shard never got its index.
    last = sorted(out.glob("shard_*.jsonl"))[-1]
    last.unlink()
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors")}
    precompute(config, out, text_encoders=TINY_TEXT, progress=False)
    after = {p.name: p.read_bytes() for p in out.glob("shard_*")}
    assert after == before
    rewritten = [
        p.name for p in out.glob("shard_*.safetensors") if p.stat().st_mtime_ns != stamp[p.name]
    ]
    assert rewritten == [last.with_suffix(".safetensors").name]
    with pytest.raises(ValueError, match="other settings"):
        precompute(replace(config, num_frames=4), out, text_encoders=TINY_TEXT, progress=False)


def test_precompute_counts_unreadable_clips(tae_run, shapes_data, tmp_path):
    lines = (shapes_data / "train.jsonl").read_text().splitlines()[:3]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    entry = json.loads(lines[0])
    entry["path"] = str(broken)
    manifest = tmp_path / "manifest.jsonl"
    entries = [json.loads(line) for line in lines]
    for item in entries:
        item["path"] = str(shapes_data / item["path"])
    manifest.write_text("".join(json.dumps(e) + "\n" for e in [*entries, entry]))
    config = PrecomputeConfig(
        tae=str(tae_run), data=str(manifest), size=SIZE, num_frames=FRAMES, fps=8
    )
    _, skips = precompute(config, tmp_path / "out", text_encoders=TINY_TEXT, progress=False)
    assert skips.total == 1
    dataset = LatentDataset(tmp_path / "out")
    assert len(dataset) == 3 and dataset.skips.total == 1


def test_precompute_needs_latent_stats(shapes_data, tmp_path):
    config = tae_recipe("debug")
    run = tmp_path / "tae"
    CheckpointManager(run).save(
        0,
        model_state=TAE(config).state_dict(),
        metadata={"kind": TAE_KIND, "config": {"model": config_to_dict(config)}},
    )
    with pytest.raises(ValueError, match="latent statistics"):
        precompute(
            PrecomputeConfig(tae=str(run), data=str(shapes_data / "train.jsonl")),
            tmp_path / "out",
            text_encoders=TINY_TEXT,
            progress=False,
        )


def test_concat_text_features_pads_and_masks():
    first = {"a": (torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))}
    second = {"a": (torch.full((1, 5, 4), 2.0), torch.ones(1, 5, dtype=torch.bool))}
    hidden, mask = concat_text_features(first, second)["a"]
    assert hidden.shape == (3, 5, 4)
    assert mask[:2].sum(1).tolist() == [3, 3] and mask[2].all()
    assert hidden[:2, 3:].abs().sum() == 0 and (hidden[2] == 2).all()


# ----------------------------------------------------------------------------- training


def test_training_writes_a_complete_run(t2v_run):
    scalars = read_scalars(t2v_run / "scalars.csv")
    assert [step for step, _ in scalars["loss/flow"]] == [5, 10, 15, 20]
    assert any(name.startswith("loss_t/") for name in scalars)
    assert all(value > 0 for _, value in scalars["perf/tokens_per_s"])
    assert all(0 < value < 1 for _, value in scalars["perf/mfu"])
    assert sorted(p.name for p in (t2v_run / "samples").glob("*.mp4")) == [
        "step_00000010.mp4",
        "step_00000020.mp4",
    ]
    assert (t2v_run / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = CheckpointManager.load(t2v_run)
    assert checkpoint.step == 20 and checkpoint.metadata["kind"] == "t2v"
    model, metadata = load_t2v(t2v_run)
    assert metadata["precompute"]["text_dims"] == {"tiny": 16} and not model.training


def test_sampling_reads_the_ema_when_there_is_one_and_the_raw_weights_otherwise(
    t2v_run, latents, tmp_path
):
    with_ema = CheckpointManager.load(t2v_run)
    assert t2v_config(latents).ema_decay > 0 and with_ema.ema_state
    weights = with_ema.model_state
    assert any(not torch.equal(with_ema.ema_state[name], weights[name]) for name in weights)
    model, _ = load_t2v(t2v_run)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, with_ema.ema_state[name], rtol=0, atol=0)
    # The tiny (demo) recipe keeps no average: sampling gets the trained weights.
    assert resolve_t2v_config("tiny").ema_decay == 0
    run = tmp_path / "raw"
    T2VTrainer(
        t2v_config(latents, steps=2, ema_decay=0.0, sample_every=0), run, progress=False
    ).train()
    raw = CheckpointManager.load(run)
    assert not raw.ema_state
    model, _ = load_t2v(run)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, raw.model_state[name], rtol=0, atol=0)


def test_resume_is_exact(latents, tmp_path):
    config = t2v_config(latents, steps=6, log_every=1, sample_every=0, checkpoint_every=100)
    whole = tmp_path / "whole"
    T2VTrainer(config, whole, progress=False).train()
    parts = tmp_path / "parts"
    T2VTrainer(config, parts, progress=False).train(stop_at=3)
    T2VTrainer(config, parts, progress=False).train()
    expected = read_scalars(whole / "scalars.csv")["loss/flow"]
    resumed = read_scalars(parts / "scalars.csv")["loss/flow"]
    assert [step for step, _ in resumed] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in resumed] == [value for _, value in expected]
    torch.testing.assert_close(
        CheckpointManager.load(parts).model_state, CheckpointManager.load(whole).model_state
    )


def test_gradient_accumulation_matches_one_big_batch(latents, tmp_path):
    """4 micro-batches of 1 give the same update as one batch of 4."""
    common = dict(
        steps=1, warmup_steps=0, sample_every=0, ema_decay=0.0, caption_dropout=0.0, grad_clip=0.0
    )
    big = T2VTrainer(t2v_config(latents, batch_size=4, **common), tmp_path / "a", progress=False)
    small = T2VTrainer(
        t2v_config(latents, batch_size=1, grad_accum=4, **common), tmp_path / "b", progress=False
    )
    small.model.load_state_dict(big.model.state_dict())
    # The same four samples, the same t and noise, in both.
    batch = next(iter(big.loader))
    singles = [
        {
            "latent": batch["latent"][i : i + 1],
            "text": {k: (h[i : i + 1], m[i : i + 1]) for k, (h, m) in batch["text"].items()},
        }
        for i in range(4)
    ]
    t = torch.rand(4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(batch["latent"].shape, generator=torch.Generator().manual_seed(2))
    big.t_sampler = lambda n, generator=None: t
    calls = iter(range(4))

    def one_t(n, generator=None):
        return t[next(calls)][None]

    small.t_sampler = one_t
    big_noise, small_noise = iter([noise]), iter(noise.split(1))
    big._noise = lambda shape: next(big_noise)
    small._noise = lambda shape: next(small_noise)
    big._train_step(iter([batch]))
    small._train_step(iter(singles))
    for (name, a), b in zip(
        big.model.state_dict().items(), small.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_logit_normal_location_and_spread_reach_the_trainer(latents, tmp_path):
    config = t2v_config(latents, timestep_mean=1.5, timestep_std=0.5)
    trainer = T2VTrainer(config, tmp_path / "run", progress=False)
    t = trainer.t_sampler(20_000, generator=torch.Generator().manual_seed(0))
    median = torch.sigmoid(torch.tensor(1.5)).item()
    assert abs(t.median().item() - median) < 0.01
    # std 0.5 in logit space: the middle 68% of draws span sigmoid(1.5 -+ 0.5).
    low, high = torch.quantile(t, torch.tensor([0.1587, 0.8413])).tolist()
    assert abs(low - torch.sigmoid(torch.tensor(1.0)).item()) < 0.01
    assert abs(high - torch.sigmoid(torch.tensor(2.0)).item()) < 0.01
    for bad, message in (
        (dict(timestep_std=0.0), "std"),
        (dict(timestep_mean=float("nan")), "mean"),
    ):
        with pytest.raises(ValueError, match=message):
            t2v_config(latents, **bad)


def test_resume_with_another_model_is_refused(latents, t2v_run):
    config = t2v_config(latents, model=replace(transformer_recipe("debug"), num_layers=3))
    with pytest.raises(ValueError, match="another transformer config"):
        T2VTrainer(config, t2v_run, progress=False).train()


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_same_seed_same_video_and_independent_of_batching(t2v_run, eta):
    pipeline = TextToVideoPipeline.from_checkpoint(t2v_run)
    options = SamplingOptions(
        num_frames=FRAMES, height=SIZE, width=SIZE, steps=4, cfg_scale=3.0, eta=eta
    )
    alone = pipeline(["a small red circle moving left"], seeds=[5], options=options)[0]
    batched = pipeline(
        ["a large blue square moving up", "a small red circle moving left"],
        seeds=[1, 5],
        options=options,
    )
    assert alone.shape == (FRAMES, SIZE, SIZE, 3) and alone.dtype == np.uint8
    np.testing.assert_allclose(alone.astype(int), batched[1].astype(int), atol=1)
    other = pipeline(["a small red circle moving left"], seeds=[6], options=options)[0]
    assert np.abs(other.astype(int) - alone.astype(int)).mean() > 0


def test_stochastic_sampling_renews_noise_from_the_prompt_seed(t2v_run):
    pipeline = TextToVideoPipeline.from_checkpoint(t2v_run)
    assert pipeline.path.sigma_min == load_t2v(t2v_run)[1]["config"]["sigma_min"]
    options = SamplingOptions(num_frames=FRAMES, height=SIZE, width=SIZE, steps=4, cfg_scale=3.0)
    prompt, seed = ["a small red circle moving left"], [3]
    ode = pipeline(prompt, seeds=seed, options=options)[0]
    stochastic = pipeline(prompt, seeds=seed, options=replace(options, eta=1.0))[0]
    assert np.abs(stochastic.astype(int) - ode.astype(int)).mean() > 0
    # One step has no step before the last, so nothing is renewed: the ODE's video.
    one_step = replace(options, steps=1, schedule="uniform")
    np.testing.assert_array_equal(
        pipeline(prompt, seeds=seed, options=replace(one_step, eta=1.0))[0],
        pipeline(prompt, seeds=seed, options=one_step)[0],
    )
    for bad in (dict(eta=-0.5), dict(eta=1.5)):
        with pytest.raises(ValueError, match="eta must be in"):
            replace(options, **bad)
    with pytest.raises(ValueError, match="solver must be 'euler'"):
        replace(options, eta=0.5, solver="heun")


def test_guidance_interval_outside_every_step_is_conditional_sampling(t2v_run):
    pipeline = TextToVideoPipeline.from_checkpoint(t2v_run)
    options = SamplingOptions(num_frames=FRAMES, height=SIZE, width=SIZE, steps=4, cfg_scale=5.0)
    prompt, seed = ["a small red circle moving left"], [3]
    guided = pipeline(prompt, seeds=seed, options=options)[0]
    # Euler evaluates the velocity at the start of each step, never at t = 1.
    never = pipeline(prompt, seeds=seed, options=replace(options, cfg_interval=(1.0, 1.0)))[0]
    conditional = pipeline(prompt, seeds=seed, options=replace(options, cfg_scale=1.0))[0]
    whole = pipeline(prompt, seeds=seed, options=replace(options, cfg_interval=(0.0, 1.0)))[0]
    np.testing.assert_array_equal(never, conditional)
    np.testing.assert_array_equal(whole, guided)
    assert np.abs(guided.astype(int) - conditional.astype(int)).mean() > 0
    with pytest.raises(ValueError, match="guidance interval"):
        replace(options, cfg_interval=(0.6, 0.2))


def test_sample_to_folder_writes_prompts_index(t2v_run, tmp_path):
    pipeline = TextToVideoPipeline.from_checkpoint(t2v_run)
    options = SamplingOptions(num_frames=FRAMES, height=SIZE, width=SIZE, steps=2)
    prompts = ["a small red circle moving left", 'a sign that says "hi"', "a cat"]
    paths = sample_to_folder(
        pipeline, prompts, tmp_path, seed=10, options=options, batch_size=2, progress=False
    )
    lines = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    assert [line["seed"] for line in lines] == [10, 11, 12]
    assert [tmp_path / line["path"] for line in lines] == paths and all(p.is_file() for p in paths)


def test_sampling_rejects_bad_input(t2v_run):
    pipeline = TextToVideoPipeline.from_checkpoint(t2v_run)
    options = SamplingOptions(num_frames=FRAMES, height=SIZE, width=SIZE, steps=2)
    with pytest.raises(ValueError, match="empty prompt"):
        pipeline(["   "], seeds=[0], options=options)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipeline(["a cat"], seeds=[0], options=replace(options, height=40))
    config = transformer_recipe("debug")
    with pytest.raises(ValueError, match="position tables"):
        latent_shape_for(config, 8 * (config.max_latent_frames + 1), SIZE, SIZE)
    with pytest.raises(ValueError, match="seeds"):
        pipeline(["a cat"], seeds=[0, 1], options=options)


def test_latent_shape_follows_the_tae_temporal_compression_and_the_patch():
    config = transformer_recipe("debug")  # patch (1, 2, 2), 16 latent channels
    assert latent_shape_for(config, 16, 64, 32) == (16, 2, 8, 4)
    assert latent_shape_for(config, 16, 64, 32, temporal_compression=4) == (16, 4, 8, 4)
    assert latent_shape_for(config, 13, 32, 32, temporal_compression=4) == (16, 4, 4, 4)
    two = replace(config, patch_size=(2, 2, 2))
    assert latent_shape_for(two, 16, 32, 32, temporal_compression=4) == (16, 4, 4, 4)
    # 12 frames make 3 latent frames: not whole patches of 2.
    with pytest.raises(ValueError, match="multiple of 2"):
        latent_shape_for(two, 12, 32, 32, temporal_compression=4)
    with pytest.raises(ValueError, match="frames cannot be represented"):
        latent_shape_for(config, 0, 32, 32)


def test_load_t2v_refuses_a_tae_checkpoint(tae_run):
    with pytest.raises(ValueError, match="not a text-to-video checkpoint"):
        load_t2v(tae_run)


def test_prompts_files_plain_and_jsonl(tmp_path):
    plain = tmp_path / "prompts.txt"
    plain.write_text("a dog runs\n\n  a cat sleeps  \n")
    assert read_prompts_file(plain) == ["a dog runs", "a cat sleeps"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a dog"}\n{"caption": "a cat"}\n')
    assert read_prompts_file(jsonl) == ["a dog", "a cat"]
    jsonl.write_text('{"prompt": "a dog"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_prompts_file(jsonl)


# ----------------------------------------------------------------------------- CLI


def test_cli_precompute_train_sample_eval(tae_run, shapes_data, tmp_path, capsys, monkeypatch):
    import moviegen.cli as cli

    monkeypatch.setattr(cli, "_text_encoders", lambda args: TINY_TEXT)
    out = tmp_path / "latents"
    args = ["precompute", "--tae", str(tae_run), "--data", str(shapes_data / "train.jsonl")]
    assert main([*args, "--out", str(out), "--size", str(SIZE), "--frames", "8", "--quiet"]) == 0
    run = tmp_path / "t2v"
    train = ["train", "--recipe", "debug", "--latents", str(out), "--out", str(run), "--quiet"]
    assert main([*train, "--steps", "4", "--set", "sample_every=0"]) == 0
    video = tmp_path / "one.mp4"
    sample = ["sample", "--checkpoint", str(run), "--size", str(SIZE), "--steps", "2"]
    assert main([*sample, "--num-frames", "8", "--prompt", "a cat", "--output", str(video)]) == 0
    assert video.is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle moving left\na large blue square moving up\n")
    folder = tmp_path / "samples"
    assert (
        main(
            [
                *sample,
                "--num-frames",
                "8",
                "--prompts-file",
                str(prompts),
                "--output",
                str(folder),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", "shapes", "--samples", str(folder), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_videos"] == 2


def test_cli_errors_are_clear(t2v_run, tmp_path, capsys):
    code = main(
        [
            "sample",
            "--checkpoint",
            str(t2v_run),
            "--prompt",
            "",
            "--output",
            str(tmp_path / "x.mp4"),
        ]
    )
    assert code == USAGE_ERROR and "empty prompt" in capsys.readouterr().err
    code = main(
        [
            "sample",
            "--checkpoint",
            str(t2v_run),
            "--prompt",
            "a cat",
            "--size",
            "40",
            "--output",
            str(tmp_path / "x.mp4"),
        ]
    )
    assert code == USAGE_ERROR and "multiple of 16" in capsys.readouterr().err
    sample = ["sample", "--checkpoint", str(t2v_run), "--prompt", "a cat"]
    code = main([*sample, "--eta", "2", "--output", str(tmp_path / "x.mp4")])
    assert code == USAGE_ERROR and "eta must be in [0, 1]" in capsys.readouterr().err
    code = main([*sample, "--eta", "1", "--solver", "heun", "--output", str(tmp_path / "x.mp4")])
    assert code == USAGE_ERROR and "solver must be 'euler'" in capsys.readouterr().err
    code = main(["train", "--latents", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == USAGE_ERROR and "not a precompute folder" in capsys.readouterr().err


def test_cli_sample_eta_selects_the_stochastic_sampler(t2v_run, tmp_path):
    from moviegen.data.video_io import read_video

    videos = {}
    for eta in ("0", "1"):
        path = tmp_path / f"eta{eta}.mkv"  # lossless, so the comparison sees the solver
        args = [
            "sample",
            "--checkpoint",
            str(t2v_run),
            "--prompt",
            "a small red circle moving left",
        ]
        extra = ["--size", str(SIZE), "--num-frames", str(FRAMES), "--steps", "4", "--seed", "3"]
        assert main([*args, *extra, "--eta", eta, "--output", str(path), "--quiet"]) == 0
        videos[eta] = read_video(path)
    pipeline = TextToVideoPipeline.from_checkpoint(t2v_run)
    options = SamplingOptions(num_frames=FRAMES, height=SIZE, width=SIZE, steps=4, eta=1.0)
    expected = pipeline(["a small red circle moving left"], seeds=[3], options=options)[0]
    np.testing.assert_array_equal(videos["1"], expected)
    assert np.abs(videos["1"].astype(int) - videos["0"].astype(int)).mean() > 0


def test_cli_info_prints_the_30b_parameter_count(capsys):
    assert main(["info", "--recipe", "30B"]) == 0
    out = capsys.readouterr().out
    assert "29,260,548,160" in out and "6144" in out
