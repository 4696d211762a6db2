"""Both trainers under real ``torchrun`` on 2 gloo CPU processes.

Every launch is ``python -m torch.distributed.run --standalone --nproc_per_node 2
-m moviegen ...``, the command a user types. The launches (the expensive part:
each pays the imports of two processes) are made once per module by the
``t2v_runs`` / ``tae_runs`` fixtures; the tests compare what they left on disk:

- exact resume: 6 steps in one go == 3 steps, all processes exit, relaunch, 3 more
  (the same per-step losses in ``scalars.csv``, bit-identical weights);
- 2 ranks == 1 process with the same global batch (text-to-video);
- the consolidated copy that sampling reads equals the DCP weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import save_random_tae_run
from moviegen.data.precompute import PrecomputeConfig, precompute
from moviegen.data.shapes import generate_shapes_dataset
from moviegen.distributed.checkpoint import read_checkpoint, resolve_checkpoint
from moviegen.pipeline.sample import load_t2v
from moviegen.tae.checkpoint import load_tae
from moviegen.text import TextEncoderConfig
from moviegen.train.checkpoint import CheckpointManager
from moviegen.train.distributed_run import RunEnv, run_env, torchrun_env
from moviegen.train.ema import EMA
from moviegen.train.logging import read_scalars
from moviegen.train.resumable import DCP_DIRNAME, StateDictNames
from moviegen.train.t2v_trainer import T2VTrainer, resolve_t2v_config

pytestmark = pytest.mark.distributed

NUM_RANKS = 2
# One torchrun launch (2 processes: imports, process group, a few steps, DCP
# saves) takes 10-25 s on 2 shared cores; a hang fails instead of blocking.
LAUNCH_TIMEOUT_S = 240
STEPS = 6
STOP_AT = 3
SIZE, FRAMES = 32, 8
# 16 clips, a quarter held out: 12 training clips, 3 full global batches of 4
# per epoch, so that no batch is a padded tail (those differ between world sizes).
NUM_CLIPS = 16
TINY_TEXT = [TextEncoderConfig(name="tiny", kind="tiny", max_length=64, dim=16, num_layers=1)]
# Relative difference of the per-step losses allowed between 2 ranks and 1
# process (float summation order; measured: 0, the losses are bit-identical).
LOSS_RTOL = 1e-5
# Final weights, 2 ranks vs 1 process (sharded gradient norms and reductions
# round differently; measured ~5e-8, but AdamW divides near-zero gradients by
# their own tiny second moments, and two full-suite runs exceeded 1e-6 in
# transformer.timestep_embed.fc1.weight; a wrong reduction is off by far more).
WEIGHT_ATOL = 1e-5
# Overrides of every text-to-video launch: every step logged, no MFU benchmark.
T2V_SETTINGS = ("log_every=1", "peak_flops=1e12", "sample_every=0")
# The last 2 steps train the decoder alone (whole-clip latents, keyed windows),
# so the relaunch at STOP_AT resumes into that phase.
TAE_SETTINGS = ("log_every=1", "val_every=100", "decoder_only_steps=2")


@pytest.fixture(scope="module", autouse=True)
def ranks_thread_count():
    """In-process reference runs use one thread, as every rank does
    (``OMP_NUM_THREADS=1`` in :func:`torchrun`): with two, matmul reductions
    round differently, AdamW magnifies that in weights with near-zero
    gradients, and a full-suite run once exceeded ``WEIGHT_ATOL``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _settings(*overrides: str) -> list[str]:
    return [word for override in overrides for word in ("--set", override)]


def torchrun(*args: object) -> None:
    """``torchrun --nproc_per_node 2 -m moviegen ARGS``; fails with the output on error."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={NUM_RANKS}",
        "-m",
        "moviegen",
        *(str(arg) for arg in args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    if result.returncode != 0:
        pytest.fail(
            f"torchrun exited with {result.returncode}:\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )


def losses(run: Path, name: str) -> list[tuple[int, float]]:
    return read_scalars(run / "scalars.csv")[name]


def dcp_weights(run: Path, prefix: str) -> dict[str, torch.Tensor]:
    """``prefix``-stripped tensors of the newest DCP checkpoint of ``run``."""
    flat = read_checkpoint(run / DCP_DIRNAME, prefix=prefix)
    return {key[len(prefix) :]: value for key, value in flat.items()}


def assert_equal_weights(actual: dict, expected: dict, **tolerance) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name],
            value,
            msg=lambda text, name=name: f"{name}: {text}",
            **(tolerance or {"rtol": 0, "atol": 0}),
        )


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(
        out, num_clips=NUM_CLIPS, size=SIZE, num_frames=FRAMES, val_fraction=0.25, seed=3,
        progress=False,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def latents(tmp_path_factory, shapes_data) -> Path:
    """Precomputed latents of a random debug TAE (with latent statistics)."""
    tae_run = save_random_tae_run(tmp_path_factory.mktemp("tae"), shapes_data / "train.jsonl")
    out = tmp_path_factory.mktemp("latents")
    config = PrecomputeConfig(
        tae=str(tae_run), data=str(shapes_data / "train.jsonl"), size=SIZE, num_frames=FRAMES,
        fps=8, shard_size=4,
    )  # fmt: skip
    precompute(config, out, text_encoders=TINY_TEXT, progress=False)
    return out


# ----------------------------------------------------------------------------- launches


@pytest.fixture(scope="module")
def t2v_runs(tmp_path_factory, latents) -> dict[str, Path]:
    """``whole``: 6 steps (checkpoints at 3 and 6, samples at the end); ``parts``:
    3 steps, exit, 3 more (async DCP saves)."""
    root = tmp_path_factory.mktemp("t2v")
    common = ["train", "--recipe", "debug", "--latents", latents, "--steps", STEPS, "--quiet"]
    whole, parts = root / "whole", root / "parts"
    torchrun(
        *common, "--out", whole,
        *_settings(*T2V_SETTINGS, "checkpoint_every=3", "keep_last=1", "sample_every=6"),
    )  # fmt: skip
    split = _settings(*T2V_SETTINGS, "checkpoint_every=100", "async_checkpoint=true")
    torchrun(*common, "--out", parts, "--stop-at", STOP_AT, *split)
    torchrun(*common, "--out", parts, *split)
    return {"whole": whole, "parts": parts}


@pytest.fixture(scope="module")
def tae_runs(tmp_path_factory, shapes_data) -> dict[str, Path]:
    """As ``t2v_runs`` for the TAE (with an image batch every 4 batches)."""
    root = tmp_path_factory.mktemp("tae_runs")
    common = ["tae", "train", "--recipe", "debug", "--data", shapes_data / "train.jsonl"]
    common += ["--steps", STEPS, "--quiet"]
    whole, parts = root / "whole", root / "parts"
    # Validation (rank 0) in the uninterrupted run only: it changes no training state.
    val = ["--val", shapes_data / "val.jsonl"]
    torchrun(*common, *val, "--out", whole, *_settings(*TAE_SETTINGS, "checkpoint_every=3"))
    split = _settings(*TAE_SETTINGS, "checkpoint_every=100")
    torchrun(*common, "--out", parts, "--stop-at", STOP_AT, *split)
    torchrun(*common, "--out", parts, *split)
    return {"whole": whole, "parts": parts}


# ----------------------------------------------------------------------------- text-to-video


def test_t2v_resume_after_relaunch_is_exact(t2v_runs):
    whole, parts = t2v_runs["whole"], t2v_runs["parts"]
    expected = losses(whole, "loss/flow")
    resumed = losses(parts, "loss/flow")
    assert [step for step, _ in resumed] == list(range(1, STEPS + 1))
    assert resumed == expected
    for prefix in ("model.", "ema.shadow.", "optimizer.state."):
        assert_equal_weights(dcp_weights(parts, prefix), dcp_weights(whole, prefix))
    assert_equal_weights(
        CheckpointManager.load(parts).model_state, CheckpointManager.load(whole).model_state
    )


def test_t2v_two_ranks_match_one_process_with_the_same_global_batch(t2v_runs, latents, tmp_path):
    config = resolve_t2v_config(
        "debug", latents=str(latents), overrides=[*T2V_SETTINGS, f"steps={STEPS}"]
    )
    config = replace(config, checkpoint_every=100)
    assert config.batch_size == 4  # global; 2 per rank in the launches
    one = tmp_path / "one"
    T2VTrainer(config, one, progress=False).train()
    single, double = losses(one, "loss/flow"), losses(t2v_runs["whole"], "loss/flow")
    assert [step for step, _ in single] == [step for step, _ in double]
    for (step, a), (_, b) in zip(single, double, strict=True):
        assert abs(a - b) <= LOSS_RTOL * abs(a), (step, a, b)
    expected = CheckpointManager.load(one)
    actual = CheckpointManager.load(t2v_runs["whole"])
    assert_equal_weights(actual.model_state, expected.model_state, rtol=0, atol=WEIGHT_ATOL)
    assert_equal_weights(actual.ema_state, expected.ema_state, rtol=0, atol=WEIGHT_ATOL)


def test_t2v_consolidated_checkpoint_is_what_sampling_loads(t2v_runs):
    whole = t2v_runs["whole"]
    # Layout: sharded training state under dcp/, consolidated weights where
    # single-process runs keep theirs (keep_last=1 applies to both).
    folder = resolve_checkpoint(whole / DCP_DIRNAME)
    assert folder.name == f"step_{STEPS:08d}"
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert [p.name for p in CheckpointManager(whole).list()] == [folder.name]
    consolidated = CheckpointManager.load(whole)
    assert consolidated.step == STEPS and consolidated.train_state is None
    assert consolidated.metadata["kind"] == "t2v"
    assert consolidated.metadata["config"]["parallel"]["dp_shard"] == -1

    ema_model, metadata = load_t2v(whole)
    assert metadata["precompute"]["text_dims"] == {"tiny": 16}
    assert_equal_weights(ema_model.state_dict(), dcp_weights(whole, "ema.shadow."))
    model, _ = load_t2v(whole, use_ema=False)
    assert_equal_weights(model.state_dict(), dcp_weights(whole, "model."))
    # Rank 0 wrote the samples at the end.
    assert sorted(p.name for p in (whole / "samples").iterdir()) == [
        f"step_{STEPS:08d}.mp4",
        f"step_{STEPS:08d}.txt",
    ]


def test_single_process_refuses_to_resume_a_distributed_run(t2v_runs, latents):
    config = resolve_t2v_config(
        "debug", latents=str(latents), overrides=[*T2V_SETTINGS, f"steps={STEPS + 1}"]
    )
    with pytest.raises(ValueError, match="weights only"):
        T2VTrainer(config, t2v_runs["whole"], progress=False).train()


# ----------------------------------------------------------------------------- TAE


def test_tae_resume_after_relaunch_is_exact(tae_runs):
    whole, parts = tae_runs["whole"], tae_runs["parts"]
    expected = losses(whole, "loss/total")
    resumed = losses(parts, "loss/total")
    assert [step for step, _ in resumed] == list(range(1, STEPS + 1))
    assert resumed == expected
    flags = read_scalars(parts / "scalars.csv")["train/decoder_only"]
    assert [flag for _, flag in flags] == [0.0] * (STEPS - 2) + [1.0] * 2
    for prefix in ("model.", "ema.shadow."):
        assert_equal_weights(dcp_weights(parts, prefix), dcp_weights(whole, prefix))
    # Rank 0 validated and wrote the preview; reconstruction loads the consolidated EMA.
    assert "val/psnr" in read_scalars(whole / "scalars.csv")
    assert_equal_weights(load_tae(whole).state_dict(), dcp_weights(whole, "ema.shadow."))


# ----------------------------------------------------------------------------- pieces


def test_ema_of_an_activation_checkpointed_model_keeps_the_plain_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    wrapped = torch.nn.Sequential(checkpoint_wrapper(plain[0]), plain[1])
    assert "0._checkpoint_wrapped_module.weight" in dict(wrapped.named_parameters())
    view = StateDictNames(wrapped)
    ema = EMA(view, decay=0.5)
    with torch.no_grad():
        plain[0].weight.add_(1.0)
    ema.update(view)
    # Every weight is tracked (not only the unwrapped ones), under plain names.
    assert sorted(ema.shadow_state_dict()) == sorted(plain.state_dict())
    expected = plain[0].weight - 0.5
    torch.testing.assert_close(ema.shadow_state_dict()["0.weight"], expected)


# ----------------------------------------------------------------------------- environment


def test_torchrun_environment_is_read_and_checked(monkeypatch):
    assert torchrun_env({}) == RunEnv()
    env = torchrun_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (env.rank, env.local_rank, env.world_size, env.is_main) == (3, 1, 4, False)
    with pytest.raises(ValueError, match="inconsistent"):
        torchrun_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="not an integer"):
        torchrun_env({"WORLD_SIZE": "two"})
    # Several processes but nobody initialised the group: a clear error, not a hang.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="distributed_run"):
        run_env()


# A torchrun job of its own: rank 1 finishes its work late (or fails); each rank
# appends when it finished and when it left distributed_run.
_TEARDOWN_SCRIPT = """
import sys, time
from pathlib import Path
import torch.distributed as dist
from moviegen.train.distributed_run import distributed_run

log, late, fail = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "fail"
with distributed_run() as env:
    if env.rank == 1:
        time.sleep(late)
        if fail:
            raise ValueError("rank 1 failed on purpose")
    with log.open("a") as f:
        f.write(f"done {env.rank} {time.time()}\\n")
with log.open("a") as f:
    f.write(f"left {env.rank} {time.time()} {dist.is_initialized()}\\n")
"""


def _launch_script(script: Path, *args: object) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={NUM_RANKS}", script, *(str(arg) for arg in args),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_ranks_leave_the_process_group_together_and_a_failure_is_not_waited_on(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_TEARDOWN_SCRIPT)
    late_s = 2.0
    log = tmp_path / "ok.log"
    result = _launch_script(script, log, late_s, "ok")
    assert result.returncode == 0, result.stderr[-4000:]
    events = {tuple(line.split()[:2]): line.split()[2:] for line in log.read_text().splitlines()}
    assert set(events) == {(kind, rank) for kind in ("done", "left") for rank in "01"}
    # Rank 0 finished at once but left only after rank 1 had finished, and
    # both left with the group destroyed.
    assert float(events["left", "0"][0]) >= float(events["done", "1"][0])
    assert events["left", "0"][1] == events["left", "1"][1] == "False"

    # A rank that raises skips the teardown barrier: the job ends with its
    # error instead of waiting for the collective timeout.
    log = tmp_path / "fail.log"
    started = time.monotonic()
    result = _launch_script(script, log, late_s, "fail")
    assert result.returncode != 0
    assert "rank 1 failed on purpose" in result.stderr
    assert time.monotonic() - started < 60
    assert "left 1" not in log.read_text()
