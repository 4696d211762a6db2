"""DCP checkpoints: FSDP2 round trip on 2 gloo ranks, single process, killed saves,
retention, async saves, consolidated export, bad input.

The 2-rank checks share one spawned group (module fixture ``fsdp_results``):
the workers train, save, resume and record what the tests compare. Workers
and killed-save children are spawned processes with deadlines, so a hang
fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn
from torch.multiprocessing import ProcessExitedException

from moviegen.distributed import checkpoint as dcp_checkpoint
from moviegen.distributed.checkpoint import (
    CONFIG_FILENAME,
    DistributedCheckpointer,
    EMAState,
    ModelState,
    OptimizerState,
    PerRank,
    RNGState,
    StateCallbacks,
    export_consolidated,
    read_checkpoint,
    resolve_checkpoint,
)
from moviegen.distributed.spawn import run_spawned
from moviegen.train.checkpoint import COMPLETE_MARKER, CheckpointManager
from moviegen.train.ema import EMA

WORLD_SIZE = 2
# Deadline for a whole group of spawned workers (imports included, on 2 shared cores).
SPAWN_TIMEOUT_S = 240
# A collective that waits longer than this fails (a peer died or diverged).
COLLECTIVE_TIMEOUT_S = 90
# Tiny MLP and batch: enough for FSDP2 to shard every parameter over 2 ranks.
IN_DIM, HIDDEN_DIM, OUT_DIM = 6, 8, 4
BATCH = 5
LR = 1e-2
WARMUP_STEPS = 4
EMA_DECAY = 0.9
MODEL_SEED = 11
# Data / global RNG seed of rank r is DATA_SEED + r, so the ranks' RNG streams differ.
DATA_SEED = 100
# A fresh trainer is built from other seeds, so only a load can make it match.
FRESH_SEED_OFFSET = 1000
STEPS_BEFORE_SAVE = 3
KEEP_LAST = 2
NUM_DRAWS = 3
CONFIG = {"model": {"hidden_dim": HIDDEN_DIM}, "lr": LR}
# Exit code of a killed-save child that was, wrongly, not killed.
EXIT_NOT_KILLED = 3


# ----------------------------------------------------------------------------- a tiny trainer


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP_STEPS)


class _SamplerPosition:
    """Stand-in for the bucket sampler's position (Stateful)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.offset = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


@dataclass
class _Trainer:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: _SamplerPosition
    generator: torch.Generator
    train_seconds: float = 0.0

    def state(self) -> dict[str, Any]:
        """What a trainer hands to the checkpointer."""
        return {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "ema": EMAState(self.ema),
            "scheduler": self.scheduler,
            "sampler": self.sampler,
            "progress": StateCallbacks(
                lambda: {"train_seconds": self.train_seconds},
                lambda state: setattr(self, "train_seconds", float(state["train_seconds"])),
            ),
            "rng": PerRank(RNGState(self.generator)),
        }

    def step(self) -> torch.Tensor:
        """One optimizer step on a batch drawn from the trainer's generator; returns the loss."""
        x = torch.randn(BATCH, IN_DIM, generator=self.generator)
        y = torch.randn(BATCH, OUT_DIM, generator=self.generator)
        loss = F.mse_loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.update(self.model)
        self.scheduler.step()
        self.sampler.offset += 1
        self.train_seconds += 0.5
        return loss.detach()


def _make_model(seed: int, layers: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    modules: list[nn.Module] = [
        nn.Linear(IN_DIM, HIDDEN_DIM),
        nn.ReLU(),
        nn.Linear(HIDDEN_DIM, OUT_DIM),
    ]
    for _ in range(layers - 2):
        modules += [nn.ReLU(), nn.Linear(OUT_DIM, OUT_DIM)]
    return nn.Sequential(*modules)


def _build_trainer(
    *, model_seed: int, data_seed: int, mesh: Any = None, layers: int = 2
) -> _Trainer:
    model = _make_model(model_seed, layers)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    _seed_globals(data_seed)
    return _Trainer(
        model=model,
        optimizer=optimizer,
        ema=EMA(model, decay=EMA_DECAY),
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup),
        sampler=_SamplerPosition(),
        generator=torch.Generator().manual_seed(data_seed),
    )


def _seed_globals(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _rng_draws(generator: torch.Generator) -> torch.Tensor:
    """Draws from every generator a resume must restore: torch, Python, NumPy, the trainer's."""
    return torch.cat(
        [
            torch.rand(NUM_DRAWS, dtype=torch.float64),
            torch.tensor([random.random() for _ in range(NUM_DRAWS)], dtype=torch.float64),
            torch.from_numpy(np.random.rand(NUM_DRAWS)),
            torch.rand(NUM_DRAWS, generator=generator, dtype=torch.float64),
        ]
    )


def _full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unsharded copies (a collective under FSDP2: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
        for name, t in tensors.items()
    }


def _assert_same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[name], value), name
        else:
            assert actual[name] == value, name


# ----------------------------------------------------------------------------- 2 ranks (FSDP2)


def _fsdp_worker(rank: int, root_str: str) -> dict[str, Any]:
    """Train, save (sync and async), resume into fresh trainers; record what tests compare."""
    from torch.distributed.device_mesh import init_device_mesh

    root = Path(root_str)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    results: dict[str, Any] = {}
    trainer = _build_trainer(model_seed=MODEL_SEED, data_seed=DATA_SEED + rank, mesh=mesh)
    sync = DistributedCheckpointer(root / "sync", keep_last=KEEP_LAST)
    for step in range(1, STEPS_BEFORE_SAVE + 1):
        trainer.step()
        sync.save(step, trainer.state(), config=CONFIG)
    results["model_at_save"] = _full(trainer.model.state_dict())
    results["ema_at_save"] = _full(trainer.ema.shadow_state_dict())

    # The async save must snapshot now, although training goes on before it commits.
    async_ckpt = DistributedCheckpointer(root / "async", async_save=True)
    async_ckpt.save(STEPS_BEFORE_SAVE, trainer.state(), config=CONFIG)
    results["async_pending"] = async_ckpt.is_pending
    results["async_listed_before_wait"] = len(async_ckpt.list())
    results["draws_after_save"] = _rng_draws(trainer.generator)
    results["loss_next"] = trainer.step()
    results["model_next"] = _full(trainer.model.state_dict())
    results["ema_next"] = _full(trainer.ema.shadow_state_dict())
    async_ckpt.close()

    for name, ckpt in (("sync", sync), ("async", DistributedCheckpointer(root / "async"))):
        fresh = _build_trainer(
            model_seed=MODEL_SEED + FRESH_SEED_OFFSET,
            data_seed=DATA_SEED + FRESH_SEED_OFFSET + rank,
            mesh=mesh,
        )
        info = ckpt.load(fresh.state())
        results[f"{name}_step"] = info.step
        results[f"{name}_config"] = json.dumps(info.config)
        results[f"{name}_draws"] = _rng_draws(fresh.generator)
        results[f"{name}_position"] = [
            fresh.sampler.offset,
            fresh.scheduler.last_epoch,
            fresh.ema.num_updates,
            fresh.train_seconds,
        ]
        results[f"{name}_loss"] = fresh.step()
        results[f"{name}_model"] = _full(fresh.model.state_dict())
        results[f"{name}_ema"] = _full(fresh.ema.shadow_state_dict())

    wrong = _build_trainer(model_seed=MODEL_SEED, data_seed=DATA_SEED, mesh=mesh, layers=3)
    try:
        sync.load({"model": ModelState(wrong.model)})
        results["mismatch_error"] = ""
    except ValueError as error:
        results["mismatch_error"] = str(error)
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    """Run the 2-rank workers once; (their folder, each rank's results)."""
    root = tmp_path_factory.mktemp("fsdp")
    results = run_spawned(
        _fsdp_worker,
        args=(str(root),),
        world_size=WORLD_SIZE,
        timeout_s=SPAWN_TIMEOUT_S,
        collective_timeout_s=COLLECTIVE_TIMEOUT_S,
    )
    return root, results


@pytest.mark.distributed
def test_fsdp_round_trip_resumes_exactly(fsdp_run):
    _, results = fsdp_run
    for rank, result in enumerate(results):
        assert result["sync_step"] == STEPS_BEFORE_SAVE
        assert json.loads(result["sync_config"]) == CONFIG
        # Each rank gets its own RNG streams back, not rank 0's.
        assert torch.equal(result["sync_draws"], result["draws_after_save"]), rank
        assert result["sync_position"] == [STEPS_BEFORE_SAVE] * 3 + [0.5 * STEPS_BEFORE_SAVE]
        assert torch.equal(result["sync_loss"], result["loss_next"]), rank
        _assert_same(result["sync_model"], result["model_next"])
        _assert_same(result["sync_ema"], result["ema_next"])
    assert not torch.equal(results[0]["draws_after_save"], results[1]["draws_after_save"])


@pytest.mark.distributed
def test_fsdp_layout_and_retention(fsdp_run):
    root, _ = fsdp_run
    ckpt = DistributedCheckpointer(root / "sync", keep_last=KEEP_LAST)
    steps = list(range(STEPS_BEFORE_SAVE - KEEP_LAST + 1, STEPS_BEFORE_SAVE + 1))
    assert [path.name for path in ckpt.list()] == [f"step_{step:08d}" for step in steps]
    assert not [p for p in ckpt.checkpoints_dir.iterdir() if p.name.startswith(".")]
    latest = ckpt.latest()
    marker = json.loads((latest / COMPLETE_MARKER).read_text())
    assert marker["world_size"] == WORLD_SIZE and marker["step"] == STEPS_BEFORE_SAVE
    assert json.loads((latest / CONFIG_FILENAME).read_text()) == CONFIG
    # One shard file per rank, and each rank's RNG under its own key.
    assert len(list(latest.glob("*.distcp"))) == WORLD_SIZE
    rng = read_checkpoint(latest, prefix="rng.")
    assert {key.split(".")[1] for key in rng} == {f"rank_{rank}" for rank in range(WORLD_SIZE)}


@pytest.mark.distributed
def test_fsdp_async_save_equals_sync(fsdp_run):
    root, results = fsdp_run
    for result in results:
        assert result["async_pending"] and result["async_listed_before_wait"] == 0
        assert result["async_step"] == STEPS_BEFORE_SAVE
        assert torch.equal(result["async_draws"], result["draws_after_save"])
        assert torch.equal(result["async_loss"], result["loss_next"])
        _assert_same(result["async_model"], result["model_next"])
    # Byte for byte the same state although training changed it before the commit.
    _assert_same(read_checkpoint(root / "async"), read_checkpoint(root / "sync"))


@pytest.mark.distributed
def test_fsdp_export_loads_into_plain_model(fsdp_run, tmp_path):
    root, results = fsdp_run
    for ema, expected in ((True, results[0]["ema_at_save"]), (False, results[0]["model_at_save"])):
        out = export_consolidated(root / "sync", tmp_path / f"ema{ema}.safetensors", ema=ema)
        weights = load_safetensors(out)
        assert all(t.is_contiguous() for t in weights.values())
        model = _make_model(MODEL_SEED + FRESH_SEED_OFFSET)
        model.load_state_dict(weights, strict=True)
        _assert_same(dict(model.state_dict()), expected)
        info = json.loads(out.with_suffix(".json").read_text())
        assert info["step"] == STEPS_BEFORE_SAVE and info["config"] == CONFIG
        assert info["weights"] == ("ema" if ema else "model")


@pytest.mark.distributed
def test_fsdp_mismatched_model_names_keys(fsdp_run):
    _, results = fsdp_run
    for result in results:  # every rank raises, so none waits in a collective
        message = result["mismatch_error"]
        assert "missing from the checkpoint: [4.bias, 4.weight]" in message, message


# ----------------------------------------------------------------------------- one process


def _fresh_trainer() -> _Trainer:
    return _build_trainer(
        model_seed=MODEL_SEED + FRESH_SEED_OFFSET, data_seed=DATA_SEED + FRESH_SEED_OFFSET
    )


def test_single_process_round_trip(tmp_path):
    assert not dist.is_initialized()
    trainer = _build_trainer(model_seed=MODEL_SEED, data_seed=DATA_SEED)
    for _ in range(STEPS_BEFORE_SAVE):
        trainer.step()
    ckpt = DistributedCheckpointer(tmp_path)
    path = ckpt.save(STEPS_BEFORE_SAVE, trainer.state(), config=CONFIG)
    assert path == ckpt.latest() and (path / COMPLETE_MARKER).is_file()
    draws = _rng_draws(trainer.generator)
    loss = trainer.step()

    fresh = _fresh_trainer()
    info = ckpt.load(fresh.state())
    assert info.step == STEPS_BEFORE_SAVE and info.world_size == 1 and info.config == CONFIG
    assert torch.equal(_rng_draws(fresh.generator), draws)
    assert torch.equal(fresh.step(), loss)
    _assert_same(dict(fresh.model.state_dict()), dict(trainer.model.state_dict()))
    _assert_same(fresh.ema.shadow_state_dict(), trainer.ema.shadow_state_dict())
    assert (
        fresh.optimizer.state_dict()["param_groups"]
        == trainer.optimizer.state_dict()["param_groups"]
    )
    assert fresh.sampler.state_dict() == trainer.sampler.state_dict()
    assert fresh.train_seconds == trainer.train_seconds

    # A plain (non-Stateful) entry is replaced in the mapping, a bare EMA dict in place.
    shadow = {name: torch.zeros_like(t) for name, t in trainer.ema.shadow_state_dict().items()}
    ckpt.save(
        STEPS_BEFORE_SAVE + 1, {"extra": {"note": "hello", "count": 7}, "ema": EMAState(shadow)}
    )
    loaded = {"extra": {"note": "", "count": 0}, "ema": EMAState(dict(shadow))}
    shadow_copy = loaded["ema"].ema
    for tensor in shadow_copy.values():
        tensor.fill_(1.0)
    ckpt.load(loaded)
    assert loaded["extra"] == {"note": "hello", "count": 7}
    assert all(torch.count_nonzero(t) == 0 for t in shadow_copy.values())


def test_optimizer_state_of_parameters_without_gradients_round_trips(tmp_path):
    """A parameter no step reached has no Adam state yet; the checkpoint still
    loads into a fresh optimizer, and training goes on exactly as without the
    save (the filled state is what the first gradient would have created)."""

    def build() -> tuple[nn.Sequential, torch.optim.AdamW]:
        model = _make_model(MODEL_SEED, layers=4)  # the last Linear is never used
        return model, torch.optim.AdamW(model.parameters(), lr=LR)

    def step(model: nn.Sequential, optimizer: torch.optim.Optimizer, seed: int, *, full: bool):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(BATCH, IN_DIM, generator=generator)
        y = torch.randn(BATCH, OUT_DIM, generator=generator)
        out = model(x) if full else model[:3](x)
        F.mse_loss(out, y).backward()
        optimizer.step()
        optimizer.zero_grad()

    model, optimizer = build()
    step(model, optimizer, 0, full=False)
    unused = model[-1].weight
    assert not optimizer.state.get(unused)
    ckpt = DistributedCheckpointer(tmp_path)
    ckpt.save(1, {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)})

    fresh_model, fresh_optimizer = build()
    ckpt.load(
        {
            "model": ModelState(fresh_model),
            "optimizer": OptimizerState(fresh_model, fresh_optimizer),
        }
    )
    for seed in (1, 2):  # now every layer gets gradients
        step(model, optimizer, seed, full=True)
        step(fresh_model, fresh_optimizer, seed, full=True)
    _assert_same(dict(fresh_model.state_dict()), dict(model.state_dict()))


def test_keep_last_and_async_single_process(tmp_path):
    trainer = _build_trainer(model_seed=MODEL_SEED, data_seed=DATA_SEED)
    ckpt = DistributedCheckpointer(tmp_path, keep_last=KEEP_LAST)
    num_saves = KEEP_LAST + 2
    for step in range(1, num_saves + 1):
        trainer.step()
        ckpt.save(step, trainer.state())
    assert [p.name for p in ckpt.list()] == [
        f"step_{step:08d}" for step in range(num_saves - KEEP_LAST + 1, num_saves + 1)
    ]

    async_ckpt = DistributedCheckpointer(tmp_path / "async", async_save=True)
    final = async_ckpt.save(num_saves, trainer.state())
    assert async_ckpt.is_pending and async_ckpt.latest() is None and not final.exists()
    expected = _full(dict(trainer.model.state_dict()))
    trainer.step()  # changes the weights before the async save is committed
    assert async_ckpt.wait() == final and async_ckpt.latest() == final
    assert async_ckpt.wait() is None  # nothing pending any more
    _assert_same(read_checkpoint(final), read_checkpoint(ckpt.latest()))
    fresh = _fresh_trainer()
    assert async_ckpt.load(fresh.state()).step == num_saves
    _assert_same(dict(fresh.model.state_dict()), expected)
    async_ckpt.close()


def test_single_process_async_saves_do_not_warn(tmp_path):
    """DCP warns that it assumes "the intent is to save in a single process"
    from the async save's worker thread, which may run after the save has
    restored the caller's warning filters; it is our intent, so it stays hidden."""
    trainer = _build_trainer(model_seed=MODEL_SEED, data_seed=DATA_SEED)
    ckpt = DistributedCheckpointer(tmp_path, async_save=True)
    message = "torch.distributed is disabled, unavailable or uninitialized, assuming the intent"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt.save(1, trainer.state())
        # The worker's warning, made to come late: after save() has returned.
        late = threading.Thread(target=warnings.warn, args=(message, UserWarning))
        late.start()
        late.join()
        assert ckpt.wait() == ckpt.latest()
        warnings.warn("another warning", UserWarning, stacklevel=1)  # still shown
    ckpt.close()
    assert [str(w.message) for w in caught] == ["another warning"]


def _killed_save_child(rank: int, run_dir: str, kill_point: str, weights_path: str) -> None:
    """Save step 1, then SIGKILL itself in the middle of saving step 2."""
    trainer = _build_trainer(model_seed=MODEL_SEED, data_seed=DATA_SEED)
    trainer.step()
    ckpt = DistributedCheckpointer(run_dir)
    ckpt.save(1, trainer.state())
    save_safetensors(dict(trainer.model.state_dict()), weights_path)
    trainer.step()

    def die(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_point == "dcp_write":
        # The ranks' shard files are written; DCP's index would come next.
        from torch.distributed.checkpoint import FileSystemWriter

        FileSystemWriter.finish = die
    else:
        # DCP finished; the completion marker would come next.
        dcp_checkpoint._write_completion_marker = die
    ckpt.save(2, trainer.state())
    os._exit(EXIT_NOT_KILLED)


@pytest.mark.parametrize("kill_point", ["dcp_write", "before_marker"])
def test_killed_save_leaves_previous_checkpoint(tmp_path, kill_point):
    run_dir, weights_path = tmp_path / "run", tmp_path / "step1.safetensors"
    with pytest.raises(ProcessExitedException) as exited:
        run_spawned(
            _killed_save_child,
            args=(str(run_dir), kill_point, str(weights_path)),
            world_size=1,
            timeout_s=SPAWN_TIMEOUT_S,
            process_group=False,
        )
    assert exited.value.exit_code == -signal.SIGKILL

    checkpoints = run_dir / "checkpoints"
    partial = checkpoints / ".step_00000002.tmp"
    assert list(partial.glob("*.distcp")) and not (partial / COMPLETE_MARKER).exists()
    assert (partial / ".metadata").exists() == (kill_point == "before_marker")
    # A step folder without a marker (e.g. a half copy) is ignored as well.
    (checkpoints / "step_00000005").mkdir()

    ckpt = DistributedCheckpointer(run_dir)
    assert [p.name for p in ckpt.list()] == ["step_00000001"]
    fresh = _fresh_trainer()
    assert ckpt.load(fresh.state()).step == 1
    _assert_same(dict(fresh.model.state_dict()), load_safetensors(weights_path))

    ckpt.save(3, fresh.state())
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001", "step_00000003"]


# ----------------------------------------------------------------------------- bad input


def test_nothing_to_resume_and_missing_paths(tmp_path):
    trainer = _build_trainer(model_seed=MODEL_SEED, data_seed=DATA_SEED)
    ckpt = DistributedCheckpointer(tmp_path / "empty_run")
    assert ckpt.load(trainer.state()) is None
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    assert ckpt.load(trainer.state()) is None
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ckpt.load(trainer.state(), path=tmp_path / "nonexistent")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.load(trainer.state(), path=tmp_path / "empty_run")
    (tmp_path / "empty_run" / "checkpoints" / "step_00000001").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        resolve_checkpoint(tmp_path / "empty_run" / "checkpoints" / "step_00000001")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        export_consolidated(tmp_path / "empty_run", tmp_path / "out.safetensors")


def test_mismatched_model_and_entries_are_named(tmp_path):
    trainer = _build_trainer(model_seed=MODEL_SEED, data_seed=DATA_SEED)
    ckpt = DistributedCheckpointer(tmp_path)
    ckpt.save(1, {"model": ModelState(trainer.model), "ema": EMAState(trainer.ema)})

    deeper = _make_model(MODEL_SEED, layers=3)
    with pytest.raises(
        ValueError, match=r"'model'.*missing from the checkpoint: \[4.bias, 4.weight\]"
    ):
        ckpt.load({"model": ModelState(deeper)})
    with pytest.raises(
        ValueError, match=r"'ema'.*missing from the checkpoint: \[4.bias, 4.weight\]"
    ):
        ckpt.load({"ema": EMAState(EMA(deeper))})
    shallow = nn.Sequential(nn.Linear(IN_DIM, HIDDEN_DIM))
    with pytest.raises(
        ValueError, match=r"in the checkpoint but not in the model: \[2.bias, 2.weight\]"
    ):
        ckpt.load({"model": ModelState(shallow)})
    wide = nn.Sequential(
        nn.Linear(IN_DIM, HIDDEN_DIM + 1), nn.ReLU(), nn.Linear(HIDDEN_DIM + 1, OUT_DIM)
    )
    with pytest.raises(ValueError, match=r"shapes differ: \[0.bias: checkpoint \(8,\) vs \(9,\)"):
        ckpt.load({"model": ModelState(wide)})
    with pytest.raises(ValueError, match=r"no entries \['optimizer'\]"):
        ckpt.load({"optimizer": OptimizerState(trainer.model, trainer.optimizer)})
    with pytest.raises(ValueError, match=r"no 'ema' weights.*pass ema=False"):
        ckpt.save(2, {"model": ModelState(trainer.model)})
        export_consolidated(tmp_path, tmp_path / "out.safetensors", ema=True)


def test_invalid_arguments(tmp_path):
    model = _make_model(MODEL_SEED)
    with pytest.raises(ValueError, match="keep_last"):
        DistributedCheckpointer(tmp_path, keep_last=0)
    ckpt = DistributedCheckpointer(tmp_path)
    with pytest.raises(ValueError, match="non-negative"):
        ckpt.save(-1, {"model": ModelState(model)})
    with pytest.raises(ValueError, match="without dots"):
        ckpt.save(1, {"my.model": ModelState(model)})
    with pytest.raises(ValueError, match="empty"):
        ckpt.save(1, {})
    with pytest.raises(ValueError, match="JSON"):
        ckpt.save(1, {"model": ModelState(model)}, config={"bad": float("nan")})
    with pytest.raises(ValueError, match=r"state\['extra'\]\['loss'\]: a float64"):
        ckpt.save(1, {"model": ModelState(model), "extra": {"loss": np.float64(1.0)}})
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_consolidated(tmp_path, tmp_path / "weights.pt")
    assert ckpt.list() == []  # nothing was written by the rejected calls


def test_single_process_checkpoint_is_not_mistaken_for_dcp(tmp_path):
    model = _make_model(MODEL_SEED)
    CheckpointManager(tmp_path).save(1, model_state=model.state_dict())
    with pytest.raises(ValueError, match="not a DCP checkpoint"):
        DistributedCheckpointer(tmp_path).load({"model": ModelState(model)})


class _Payload:
    """Pickles to a call of os.mkdir: what a tampered checkpoint index could run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def test_tampered_metadata_is_refused(tmp_path):
    model = _make_model(MODEL_SEED)
    ckpt = DistributedCheckpointer(tmp_path)
    path = ckpt.save(1, {"model": ModelState(model)})
    witness = tmp_path / "code_ran"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(str(witness))))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        ckpt.load({"model": ModelState(model)})
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        export_consolidated(path, tmp_path / "out.safetensors", ema=False)
    assert not witness.exists()
