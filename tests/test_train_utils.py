"""Shared training utilities: EMA, learning-rate schedule, scalar logging, RNG capture."""

from __future__ import annotations

import importlib.util
import io
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from moviegen.train.ema import EMA, warmup_decay
from moviegen.train.logging import ScalarLogger, plot_curves, read_scalars
from moviegen.train.rng import capture_rng_state, restore_rng_state
from moviegen.train.schedule import FIT_TOLERANCE, budget_position, build_scheduler, lr_lambda

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ----------------------------------------------------------------------------- EMA


class Scalar(nn.Module):
    def __init__(self, value: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([value], dtype=dtype))


class TiedNet(nn.Module):
    """Tied input/output weights plus normalisation buffers (float and int)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.norm = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def set_weight(model: Scalar, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_matches_analytic_average(dtype):
    decay = 0.9
    model = Scalar(1.0, dtype)
    ema = EMA(model, decay=decay)
    values = [2.0, -1.0, 4.0, 0.5, 3.0]
    expected = 1.0
    for value in values:
        set_weight(model, value)
        ema.update(model)
        expected = decay * expected + (1 - decay) * value
    shadow = ema.shadow_state_dict()["weight"]
    assert shadow.dtype == torch.float32  # fp32 shadow even for a bf16 model
    assert shadow.item() == pytest.approx(expected, rel=1e-6)
    assert ema.num_updates == len(values)


def test_ema_warmup_formula():
    assert warmup_decay(0.999, 0) == pytest.approx(0.1)
    assert warmup_decay(0.999, 8) == pytest.approx(0.5)
    assert warmup_decay(0.999, 80) == pytest.approx(0.9)
    assert warmup_decay(0.999, 10**6) == 0.999

    model = Scalar(0.0)
    ema = EMA(model, decay=0.999, warmup=True)
    expected = 0.0
    for step, value in enumerate([10.0, 20.0, 30.0]):
        assert ema.current_decay() == pytest.approx((1 + step) / (10 + step))
        set_weight(model, value)
        ema.update(model)
        decay = (1 + step) / (10 + step)
        expected = decay * expected + (1 - decay) * value
    assert ema.shadow_state_dict()["weight"].item() == pytest.approx(expected, rel=1e-6)
    assert EMA(model, decay=0.5, warmup=False).current_decay() == 0.5


def test_ema_swapped_into_restores_training_weights():
    model = Scalar(1.0)
    ema = EMA(model, decay=0.5)
    set_weight(model, 3.0)
    ema.update(model)  # shadow = 2.0
    with ema.swapped_into(model):
        assert model.weight.item() == 2.0
    assert model.weight.item() == 3.0
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_into(model):
        raise RuntimeError("boom")
    assert model.weight.item() == 3.0
    ema.copy_to(model)
    assert model.weight.item() == 2.0


def test_ema_state_dict_round_trip_with_tied_weights_and_buffers():
    torch.manual_seed(0)
    model = TiedNet()
    ema = EMA(model, decay=0.8)
    for _ in range(3):
        with torch.no_grad():
            model.embed.weight.add_(1.0)
            model.norm.running_mean.add_(0.5)
            model.norm.num_batches_tracked.add_(1)
        ema.update(model)

    shadow = ema.shadow_state_dict()
    assert set(shadow) == set(model.state_dict())  # tied alias and buffers included
    assert torch.equal(shadow["head.weight"], shadow["embed.weight"])
    assert torch.equal(shadow["norm.running_mean"], model.norm.running_mean)  # copied, not averaged
    assert shadow["norm.num_batches_tracked"].item() == 3
    eval_model = TiedNet()
    eval_model.load_state_dict(shadow)  # strict

    torch.manual_seed(1)
    other = EMA(TiedNet(), decay=0.8)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.num_updates == 3
    for name, tensor in shadow.items():
        assert torch.equal(other.shadow_state_dict()[name], tensor)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(
            {"num_updates": 0, "shadow": {"embed.weight": shadow["embed.weight"]}}
        )


def test_ema_rejects_a_different_model():
    ema = EMA(Scalar(1.0), decay=0.9)
    with pytest.raises(ValueError, match="shape"):
        ema.update(nn.Linear(1, 1))  # has a "weight", of another shape
    with pytest.raises(ValueError, match="lacks"):
        ema.update(nn.Sequential(Scalar(1.0)))  # names are prefixed: "0.weight"
    with pytest.raises(ValueError, match="decay"):
        EMA(Scalar(1.0), decay=1.5)


# ----------------------------------------------------------------------------- schedule


def test_cosine_schedule_shape():
    warmup, total, floor = 10, 110, 0.1
    fn = lr_lambda("cosine", warmup_steps=warmup, total_steps=total, min_lr_ratio=floor)
    assert 0 < fn(0) < 0.1  # starts near zero, but not at zero
    values = [fn(step) for step in range(warmup + 1)]
    assert values == sorted(values)  # monotone warmup
    assert fn(warmup) == 1.0  # peak at warmup end
    assert fn(warmup + (total - warmup) // 2) == pytest.approx((1 + floor) / 2)
    assert fn(total) == pytest.approx(floor)
    assert fn(total + 50) == pytest.approx(floor)
    decay = [fn(step) for step in range(warmup, total + 1)]
    assert decay == sorted(decay, reverse=True)


def test_constant_schedule_and_no_warmup():
    fn = lr_lambda("constant", warmup_steps=4, total_steps=10)
    assert fn(0) == pytest.approx(0.2)
    assert [fn(step) for step in (4, 10, 1000)] == [1.0, 1.0, 1.0]
    assert lr_lambda("cosine", warmup_steps=0, total_steps=10)(0) == 1.0


def test_budget_position():
    exact = {"tolerance": 0.0}
    # On pace or ahead: the step itself.
    assert budget_position(30, 100, seconds=20.0, budget_s=100.0, **exact) == 30
    # Behind: half the budget spent after 10 of 100 steps -> the schedule's middle.
    assert budget_position(10, 100, seconds=50.0, budget_s=100.0, **exact) == 50
    # Budget spent: the schedule's end, never beyond it.
    assert budget_position(10, 100, seconds=250.0, budget_s=100.0, **exact) == 100
    assert budget_position(120, 100, seconds=250.0, budget_s=100.0, **exact) == 120
    with pytest.raises(ValueError, match="budget_s"):
        budget_position(1, 10, seconds=1.0, budget_s=0.0)
    with pytest.raises(ValueError, match="tolerance"):
        budget_position(1, 10, seconds=1.0, budget_s=10.0, tolerance=1.0)


def test_budget_position_lets_a_run_lag_by_the_tolerance():
    assert FIT_TOLERANCE == 0.05
    # 5 of 1000 steps behind the pace at most: never moved.
    for step, seconds in ((100, 14.9), (500, 54.9), (940, 98.9)):
        assert budget_position(step, 1000, seconds, budget_s=100.0) == step
    # Further behind: moved on, to the tolerance behind the pace.
    assert budget_position(100, 1000, seconds=30.0, budget_s=100.0) == 250
    # The budget spent: 5% before the schedule's end (a cosine's flat tail).
    assert budget_position(500, 1000, seconds=100.0, budget_s=100.0) == 950


def test_budget_position_never_shortens_the_warmup():
    exact = {"tolerance": 0.0}
    # Far behind the budget, but inside the 20 warmup steps: the step itself.
    for step in range(20):
        assert (
            budget_position(step, 100, seconds=90.0, budget_s=100.0, warmup_steps=20, **exact)
            == step
        )
    # After the warmup the budget moves the schedule on as before.
    assert budget_position(20, 100, seconds=90.0, budget_s=100.0, warmup_steps=20, **exact) == 90
    assert budget_position(30, 100, seconds=20.0, budget_s=100.0, warmup_steps=20, **exact) == 30


def test_schedule_validation():
    with pytest.raises(ValueError, match="kind"):
        lr_lambda("linear", warmup_steps=0, total_steps=10)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_lambda("cosine", warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_lambda("cosine", warmup_steps=0, total_steps=10, min_lr_ratio=2.0)


def test_build_scheduler_drives_the_optimizer():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = build_scheduler(optimizer, "cosine", warmup_steps=3, total_steps=7)
    fn = lr_lambda("cosine", warmup_steps=3, total_steps=7)
    for step in range(9):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * fn(step))
        optimizer.step()
        scheduler.step()


# ----------------------------------------------------------------------------- logging


def test_scalar_logger_csv_append_and_read(tmp_path):
    with ScalarLogger(tmp_path, tensorboard=False) as logger:
        assert logger.backends == ("csv",)
        logger.log(1, {"loss/total": 2.0, "lr": 1e-4})
        logger.log(2, {"loss/total": torch.tensor(1.5)})
        # Flushed on every call: readable while the logger is open.
        assert read_scalars(logger.csv_path)["loss/total"] == [(1, 2.0), (2, 1.5)]
    lines = (tmp_path / "scalars.csv").read_text().splitlines()
    assert lines == ["step,name,value", "1,loss/total,2.0", "1,lr,0.0001", "2,loss/total,1.5"]

    # Resume from step 1: rows appended, header not repeated, step 2 superseded.
    with ScalarLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, {"loss/total": 1.25})
        logger.log(3, {"loss/total": 1.0})
    text = (tmp_path / "scalars.csv").read_text()
    assert text.count("step,name,value") == 1
    scalars = read_scalars(tmp_path / "scalars.csv")
    assert scalars == {"loss/total": [(1, 2.0), (2, 1.25), (3, 1.0)], "lr": [(1, 1e-4)]}


def test_scalar_logger_recovers_from_torn_row(tmp_path):
    with ScalarLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"a": 1.0})
    with open(tmp_path / "scalars.csv", "a") as file:
        file.write("2,a,")  # a crash mid-row
    with ScalarLogger(tmp_path, tensorboard=False) as logger:
        logger.log(3, {"a": 3.0})
    with pytest.warns(UserWarning, match="malformed"):
        assert read_scalars(tmp_path / "scalars.csv") == {"a": [(1, 1.0), (3, 3.0)]}


def test_scalar_logger_backends_follow_tensorboard_availability(tmp_path):
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    logger = ScalarLogger(tmp_path, tensorboard=True)
    logger.log(0, {"x": 1.0})
    logger.close()
    logger.close()  # idempotent
    assert logger.backends == (("csv", "tensorboard") if has_tensorboard else ("csv",))
    assert (tmp_path / "tensorboard").is_dir() == has_tensorboard
    with pytest.raises(ValueError, match="closed"):
        logger.log(1, {"x": 1.0})


def test_scalar_logger_refuses_foreign_csv(tmp_path):
    (tmp_path / "scalars.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        ScalarLogger(tmp_path, tensorboard=False)


def test_plot_curves_writes_png(tmp_path):
    with ScalarLogger(tmp_path, tensorboard=False) as logger:
        for step in range(20):
            logger.log(
                step,
                {
                    "loss/total": math.exp(-step / 5),
                    "loss/kl": 0.1 + 0.01 * step,
                    "grad_norm": math.sin(step),  # signed: linear axis
                    "lr": 1e-4,
                },
            )
    png = plot_curves(tmp_path / "scalars.csv", tmp_path / "plots" / "curves.png")
    data = png.read_bytes()
    assert data[: len(PNG_MAGIC)] == PNG_MAGIC and len(data) > 1000
    raw = plot_curves(tmp_path / "scalars.csv", tmp_path / "raw.png", names=["lr"], smooth=0.0)
    assert raw.read_bytes()[: len(PNG_MAGIC)] == PNG_MAGIC
    with pytest.raises(ValueError, match="no scalars"):
        plot_curves(tmp_path / "scalars.csv", tmp_path / "x.png", names=["missing"])


# ----------------------------------------------------------------------------- RNG


def draw_all() -> tuple[list[float], np.ndarray, torch.Tensor]:
    return (
        [random.random(), random.gauss(0, 1)],
        np.random.standard_normal(5),
        torch.randn(5),
    )


def test_rng_state_restores_every_generator_after_weights_only_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached Gaussian in Python's state
    np.random.standard_normal(1)  # and in NumPy's
    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)
    first = draw_all()

    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True))
    second = draw_all()
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])
    assert torch.equal(first[2], second[2])
    # Drawing again without restoring gives new numbers: the test can fail.
    assert not torch.equal(draw_all()[2], second[2])


def test_restore_rng_state_rejects_incomplete_state():
    with pytest.raises(ValueError, match="numpy"):
        restore_rng_state({"python": {}, "torch": torch.get_rng_state()})
