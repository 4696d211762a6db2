"""Atomic single-process checkpoints: round trip, exact resume, retention, interrupted saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from moviegen.train import checkpoint as checkpoint_module
from moviegen.train.checkpoint import COMPLETE_MARKER, CheckpointManager
from moviegen.train.rng import capture_rng_state
from moviegen.train.schedule import build_scheduler


@dataclass(frozen=True, kw_only=True)
class TinyConfig:
    # Hidden width.
    width: int = 4


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(batch).square().mean().backward()
    optimizer.step()


def test_round_trip_and_exact_optimizer_resume(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=10)
    batches = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    train_step(model, optimizer, batches[0])
    scheduler.step()

    manager = CheckpointManager(tmp_path / "run")
    ema_state = {name: t * 0.5 for name, t in model.state_dict().items()}
    metadata = {"latent": {"mean": [0.1, -0.2], "std": [1.5, 0.9]}, "note": "x"}
    path = manager.save(
        1,
        model_state=model.state_dict(),
        train_state={
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng_state(),
            "step": 1,
            "sampler": {"epoch": 0, "position": [3, 4]},
        },
        ema_state=ema_state,
        metadata=metadata,
        config=TinyConfig(),
    )
    assert path == tmp_path / "run" / "checkpoints" / "step_00000001"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [COMPLETE_MARKER, "model.safetensors", "ema.safetensors", "train_state.pt", "metadata.json"]
    )
    # train_state.pt needs nothing beyond weights_only loading.
    torch.load(path / "train_state.pt", weights_only=True)

    loaded = CheckpointManager.load(path)
    assert loaded.step == 1 and loaded.path == path
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model_state[name], tensor)
        assert torch.equal(loaded.ema_state[name], ema_state[name])
    assert loaded.metadata == {**metadata, "config": {"width": 4}}
    assert loaded.train_state["step"] == 1
    assert loaded.train_state["sampler"] == {"epoch": 0, "position": [3, 4]}

    # Restore into fresh objects: the next step must be bit-identical.
    restored = tiny_model(seed=123)
    restored.load_state_dict(loaded.model_state)
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-2, weight_decay=0.1)
    # Build the scheduler before loading the optimizer state: LambdaLR's constructor
    # writes lr = base_lr * lambda(0) into the optimizer, over a restored lr.
    restored_scheduler = build_scheduler(
        restored_optimizer, "cosine", warmup_steps=2, total_steps=10
    )
    restored_optimizer.load_state_dict(loaded.train_state["optimizer"])
    restored_scheduler.load_state_dict(loaded.train_state["scheduler"])
    assert restored_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    train_step(model, optimizer, batches[1])
    train_step(restored, restored_optimizer, batches[1])
    for expected, actual in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(expected, actual)


def test_optional_parts_absent(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save(0, model_state={"w": torch.ones(2)})
    loaded = CheckpointManager.load(path)
    assert loaded.ema_state is None and loaded.train_state is None and loaded.metadata == {}


def test_tied_and_view_tensors_are_saved_as_copies(tmp_path):
    base = torch.arange(12.0)
    state = {"a": base, "tied": base, "view": base[2:5], "t": torch.ones(3, 2).t()}
    path = CheckpointManager(tmp_path).save(5, model_state=state)
    loaded = CheckpointManager.load(path).model_state
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)


def test_bad_inputs_are_clear_errors(tmp_path):
    manager = CheckpointManager(tmp_path)
    weights = {"w": torch.zeros(1)}
    with pytest.raises(ValueError, match="step"):
        manager.save(-1, model_state=weights)
    with pytest.raises(ValueError, match=r"model_state\['w'\]"):
        manager.save(1, model_state={"w": [1.0]})
    with pytest.raises(ValueError, match=r"train_state\['opt'\]\['bad'\].*weights_only"):
        manager.save(1, model_state=weights, train_state={"opt": {"bad": object()}})
    with pytest.raises(ValueError, match="JSON"):
        manager.save(1, model_state=weights, metadata={"x": {1, 2}})
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    # Inputs are checked before anything is written.
    assert not manager.checkpoints_dir.exists()


def test_keep_last_retention(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        manager.save(step, model_state={"w": torch.full((1,), float(step))})
    assert [p.name for p in manager.list()] == ["step_00000030", "step_00000040"]
    assert manager.latest().name == "step_00000040"
    # Saving an older step (a rewound run) keeps the one just saved.
    manager.save(5, model_state={"w": torch.zeros(1)})
    assert (tmp_path / "checkpoints" / "step_00000005").is_dir()
    # Re-saving an existing step replaces it.
    manager.save(40, model_state={"w": torch.full((1,), -1.0)})
    assert CheckpointManager.load(manager.latest()).model_state["w"].item() == -1.0
    assert not [p for p in manager.checkpoints_dir.iterdir() if p.name.startswith(".")]


def test_keep_all(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=None)
    for step in range(5):
        manager.save(step, model_state={"w": torch.zeros(1)})
    assert len(manager.list()) == 5


def test_failed_save_cleans_up_and_keeps_previous(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    first = manager.save(1, model_state={"w": torch.zeros(1)})

    def fail_mid_write(train_state, path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "_write_train_state", fail_mid_write)
    with pytest.raises(OSError, match="disk full"):
        manager.save(2, model_state={"w": torch.ones(1)}, train_state={"step": 2})
    assert manager.latest() == first
    assert [p.name for p in manager.checkpoints_dir.iterdir()] == [first.name]


KILLED_SAVE_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from moviegen.train import checkpoint
    from moviegen.train.checkpoint import CheckpointManager

    def write_then_die(train_state, path):
        # Half of a large file is on disk when the process is killed.
        with open(path, "wb") as file:
            file.write(b"\\0" * (1 << 20))
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._write_train_state = write_then_die
    manager = CheckpointManager(sys.argv[1])
    manager.save(2, model_state={"w": torch.randn(1 << 18)}, train_state={"step": 2})
    """
)


def test_killed_save_is_ignored_and_cleaned_up(tmp_path):
    manager = CheckpointManager(tmp_path)
    first = manager.save(1, model_state={"w": torch.zeros(1)})
    result = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE_SCRIPT, str(tmp_path)], capture_output=True, timeout=120
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    leftovers = [p for p in manager.checkpoints_dir.iterdir() if p != first]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".step_00000002.tmp-")
    # A step folder without COMPLETE (e.g. a copy interrupted by hand) is ignored too.
    incomplete = manager.checkpoints_dir / "step_00000003"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"junk")

    assert manager.latest() == first
    assert manager.list() == [first]
    assert CheckpointManager.resolve(tmp_path) == first
    with pytest.raises(FileNotFoundError, match="incomplete"):
        CheckpointManager.resolve(incomplete)

    second = manager.save(2, model_state={"w": torch.ones(1)})
    assert sorted(p.name for p in manager.checkpoints_dir.iterdir()) == [first.name, second.name]
    assert manager.latest() == second


def test_resolve(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        CheckpointManager.resolve(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        CheckpointManager.resolve(tmp_path / "empty")
    manager = CheckpointManager(tmp_path / "run")
    first = manager.save(100, model_state={"w": torch.zeros(1)})
    second = manager.save(200, model_state={"w": torch.zeros(1)})
    assert CheckpointManager.resolve(tmp_path / "run") == second
    assert CheckpointManager.resolve(tmp_path / "run" / "checkpoints") == second
    assert CheckpointManager.resolve(first) == first
    assert CheckpointManager.load(tmp_path / "run").step == 200


def test_truncated_file_is_detected(tmp_path):
    path = CheckpointManager(tmp_path).save(1, model_state={"w": torch.zeros(64)})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged"):
        CheckpointManager.load(path)


def test_update_metadata(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, model_state={"w": torch.zeros(1)}, metadata={"a": 1, "b": 2})
    merged = CheckpointManager.update_metadata(path, {"b": 3, "latent_stats": {"mean": [0.5]}})
    assert merged == {"a": 1, "b": 3, "latent_stats": {"mean": [0.5]}}
    assert json.loads((path / "metadata.json").read_text()) == merged
    assert CheckpointManager.load(path).metadata == merged
    assert sorted(os.listdir(path)) == sorted(
        [COMPLETE_MARKER, "metadata.json", "model.safetensors"]
    )
    with pytest.raises(ValueError, match="JSON"):
        CheckpointManager.update_metadata(path, {"bad": float("nan")})
