"""Shared fixtures: clips whose frames encode their own index, real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from moviegen.data.video_io import write_video

# Frame i of an index clip is a flat grey of level BASE + STEP * i, which
# survives lossy H.264 well enough to read the index back from the mean.
INDEX_BASE = 4
INDEX_STEP = 6
REAL_DATA_ENV = "MOVIEGEN_REAL_DATA"
_DEFAULT_REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def index_frames(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    levels = INDEX_BASE + INDEX_STEP * np.arange(num_frames)
    assert levels.max() <= 255, "too many frames to encode as grey levels"
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = levels[:, None, None, None]
    return frames


def decode_indices(frames: np.ndarray) -> list[int]:
    means = frames.reshape(len(frames), -1).mean(axis=1)
    return [round((mean - INDEX_BASE) / INDEX_STEP) for mean in means]


@pytest.fixture
def index_clip(tmp_path):
    """Factory: write an index clip and return its path."""

    def make(num_frames: int = 40, *, fps: float = 10, suffix: str = ".mp4", **kwargs) -> Path:
        path = tmp_path / f"index_{num_frames}_{fps:g}{suffix}"
        write_video(path, index_frames(num_frames, **kwargs), fps=fps)
        return path

    return make


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """``../shared/data/real`` or ``$MOVIEGEN_REAL_DATA``; skips when absent."""
    path = Path(os.environ.get(REAL_DATA_ENV, _DEFAULT_REAL_DATA))
    if not path.is_dir() or not any(path.glob("*.mp4")):
        pytest.skip(f"real clips not found at {path} (set {REAL_DATA_ENV})")
    return path


def save_random_tae_run(run: Path, train_manifest: Path) -> Path:
    """Save a randomly initialised debug TAE as a run folder, with latent statistics
    measured on ``train_manifest``, for tests that need latents but no trained TAE."""
    import torch

    from moviegen.config import config_to_dict
    from moviegen.tae.checkpoint import TAE_KIND
    from moviegen.tae.model import TAE, tae_recipe
    from moviegen.tae.stats import store_latent_stats
    from moviegen.train.checkpoint import CheckpointManager

    torch.manual_seed(0)
    config = tae_recipe("debug")
    CheckpointManager(run).save(
        0,
        model_state=TAE(config).state_dict(),
        metadata={"kind": TAE_KIND, "config": {"model": config_to_dict(config)}},
    )
    store_latent_stats(run, train_manifest, progress=False)
    return run
