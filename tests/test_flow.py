"""Flow matching: path, timestep samplers, schedules, solvers and classifier-free guidance."""

from __future__ import annotations

import pytest
import torch

import moviegen.flow as flow
from moviegen.flow import (
    SIGMA_MIN,
    ClassifierFreeGuidance,
    FlowPath,
    LogitNormalSampler,
    UniformSampler,
    build_schedule,
    build_timestep_sampler,
    euler_solve,
    guidance,
    heun_solve,
    linear_quadratic_schedule,
    linear_quadratic_time,
    path,
    schedules,
    solve,
    solvers,
    stochastic_euler_solve,
    timesteps,
    uniform_schedule,
)

LATENT_SHAPE = (3, 4, 2, 5, 6)  # (B, C, T, H, W)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_schedule(num_steps: int, seed: int = 0) -> torch.Tensor:
    """An irregular increasing grid from 0 to 1, to show exactness does not rely on the grid."""
    steps = torch.rand(
        num_steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    steps = steps + 0.05  # no vanishing steps
    return torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0) / steps.sum()])


def test_package_reexports_the_public_interface():
    assert flow.FlowPath is path.FlowPath
    assert flow.SIGMA_MIN == path.SIGMA_MIN == 1e-5
    assert flow.LogitNormalSampler is timesteps.LogitNormalSampler
    assert flow.linear_quadratic_schedule is schedules.linear_quadratic_schedule
    assert flow.solve is solvers.solve
    assert flow.ClassifierFreeGuidance is guidance.ClassifierFreeGuidance
    missing = [name for name in flow.__all__ if not hasattr(flow, name)]
    assert missing == []


# ----------------------------------------------------------------------------- path


def test_path_endpoints_are_noise_and_data():
    fp = FlowPath()
    assert fp.sigma_min == SIGMA_MIN
    x0, x1 = randn(*LATENT_SHAPE, seed=0), randn(*LATENT_SHAPE, seed=1)
    batch = LATENT_SHAPE[0]
    at_noise = fp.interpolate(x0, x1, torch.zeros(batch, dtype=torch.float64))
    at_data = fp.interpolate(x0, x1, torch.ones(batch, dtype=torch.float64))
    torch.testing.assert_close(at_noise, x0, rtol=0, atol=1e-15)
    # t = 1 keeps sigma_min of the noise.
    torch.testing.assert_close(at_data, x1 + SIGMA_MIN * x0, rtol=0, atol=1e-15)
    assert (at_data - x1).abs().max() <= SIGMA_MIN * x0.abs().max() + 1e-15


def test_path_time_is_per_sample():
    fp = FlowPath(sigma_min=0.0)
    x0, x1 = randn(*LATENT_SHAPE, seed=0), randn(*LATENT_SHAPE, seed=1)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    xt = fp.interpolate(x0, x1, t)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(xt[i], ti * x1[i] + (1 - ti) * x0[i], rtol=0, atol=1e-15)


def test_path_derivative_in_time_is_the_velocity_target():
    fp = FlowPath(sigma_min=0.01)  # large, so a wrong sigma_min factor would show
    x0, x1 = randn(*LATENT_SHAPE, seed=0), randn(*LATENT_SHAPE, seed=1)
    t = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    target = fp.velocity_target(x0, x1)
    torch.testing.assert_close(target, x1 - 0.99 * x0, rtol=0, atol=1e-15)
    # Autograd, through a random projection of each sample (each x_t[b] depends on t[b] only).
    weights = randn(*LATENT_SHAPE, seed=2)
    t.requires_grad_(True)
    (dprojection_dt,) = torch.autograd.grad((weights * fp.interpolate(x0, x1, t)).sum(), t)
    expected = (weights * target).flatten(1).sum(1)
    torch.testing.assert_close(dprojection_dt, expected, rtol=0, atol=1e-12)
    t = t.detach()
    # Finite differences agree (the path is linear in t, so any step size does).
    h = 1e-3
    finite_diff = (fp.interpolate(x0, x1, t + h) - fp.interpolate(x0, x1, t)) / h
    torch.testing.assert_close(finite_diff, target, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sigma_min", [0.0, SIGMA_MIN, 0.2])
def test_predict_x1_and_x0_invert_the_path(sigma_min):
    fp = FlowPath(sigma_min=sigma_min)
    x0, x1 = randn(*LATENT_SHAPE, seed=0), randn(*LATENT_SHAPE, seed=1)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    xt = fp.interpolate(x0, x1, t)
    v = fp.velocity_target(x0, x1)
    torch.testing.assert_close(fp.predict_x1(xt, v, t), x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(fp.predict_x0(xt, v, t), x0, rtol=0, atol=1e-12)


def test_noise_scale_is_the_weight_of_the_noise_on_the_path():
    fp = FlowPath(sigma_min=0.2)
    assert fp.noise_scale(0.0) == 1.0
    assert fp.noise_scale(1.0) == pytest.approx(0.2)
    assert fp.noise_scale(0.5) == pytest.approx(0.6)
    # With zero data, X_t is the noise scaled by it, sample by sample.
    x0 = randn(*LATENT_SHAPE, seed=0)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    xt = fp.interpolate(x0, torch.zeros_like(x0), t)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(xt[i], fp.noise_scale(ti) * x0[i], rtol=0, atol=1e-15)


def test_path_keeps_latent_dtype():
    fp = FlowPath()
    x0, x1 = randn(2, 3, dtype=torch.bfloat16), randn(2, 3, seed=1, dtype=torch.bfloat16)
    assert fp.interpolate(x0, x1, torch.rand(2)).dtype == torch.bfloat16


@pytest.mark.parametrize("bad_t_shape", [(3, 1), (4,), (), (1,)])
def test_path_rejects_wrong_t_shape(bad_t_shape):
    fp = FlowPath()
    x0, x1 = randn(*LATENT_SHAPE), randn(*LATENT_SHAPE, seed=1)
    t = torch.rand(bad_t_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        fp.interpolate(x0, x1, t)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        fp.predict_x1(x0, x1, t)


def test_path_rejects_bad_arguments():
    fp = FlowPath()
    t = torch.rand(3)
    with pytest.raises(ValueError, match="same shape"):
        fp.interpolate(torch.zeros(3, 4), torch.zeros(3, 5), t)
    with pytest.raises(ValueError, match="same shape"):
        fp.velocity_target(torch.zeros(3, 4), torch.zeros(2, 4))
    for sigma_min in (-0.1, 1.0):
        with pytest.raises(ValueError, match="sigma_min"):
            FlowPath(sigma_min=sigma_min)


# ----------------------------------------------------------------------------- timesteps


def test_logit_normal_samples_in_open_interval_with_median_half():
    sampler = LogitNormalSampler()
    t = sampler(20_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20_000,)
    assert t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    logits = torch.logit(t.double())
    assert logits.mean().item() == pytest.approx(0.0, abs=0.03)
    assert logits.std().item() == pytest.approx(1.0, abs=0.03)


def test_logit_normal_parameters_shift_and_spread():
    t = LogitNormalSampler(mean=1.5, std=0.5)(20_000, generator=torch.Generator().manual_seed(1))
    logits = torch.logit(t.double())
    assert logits.mean().item() == pytest.approx(1.5, abs=0.02)
    assert logits.std().item() == pytest.approx(0.5, abs=0.02)
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.5)).item(), abs=0.01)


@pytest.mark.parametrize("sampler", [LogitNormalSampler(), UniformSampler()], ids=repr)
def test_samplers_are_deterministic_with_a_seeded_generator(sampler):
    first = sampler(64, generator=torch.Generator().manual_seed(7))
    again = sampler(64, generator=torch.Generator().manual_seed(7))
    other = sampler(64, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    on_cpu = sampler(64, generator=torch.Generator().manual_seed(7), device="cpu")
    assert torch.equal(first, on_cpu)


def test_samplers_never_return_the_end_points():
    # Saturating logits: float32 sigmoid would give exactly 1.0 and 0.0 here.
    high = LogitNormalSampler(mean=40.0)(100, generator=torch.Generator().manual_seed(0))
    low = LogitNormalSampler(mean=-120.0)(100, generator=torch.Generator().manual_seed(0))
    assert bool((high < 1).all()) and bool((low > 0).all())


def test_uniform_sampler_covers_the_interval():
    t = UniformSampler()(20_000, generator=torch.Generator().manual_seed(0))
    assert bool(((t > 0) & (t < 1)).all())
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert (t < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_build_timestep_sampler():
    sampler = build_timestep_sampler("logit_normal", mean=0.5, std=2.0)
    assert isinstance(sampler, LogitNormalSampler)
    assert (sampler.mean, sampler.std) == (0.5, 2.0)
    assert isinstance(build_timestep_sampler("uniform"), UniformSampler)
    with pytest.raises(ValueError, match=r"logit_normal.*uniform"):
        build_timestep_sampler("cosine")


def test_samplers_reject_bad_arguments():
    for batch_size in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            LogitNormalSampler()(batch_size)
    with pytest.raises(ValueError, match="batch_size"):
        UniformSampler()(0)
    for std in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="std"):
            LogitNormalSampler(std=std)


# ----------------------------------------------------------------------------- schedules


def test_linear_quadratic_schedule_defining_points():
    schedule = linear_quadratic_schedule()  # 50 steps, 1000-step grid
    assert schedule.shape == (51,)
    assert schedule.dtype == torch.float64
    # First half: the first 25 steps of the 1000-step grid, 0, 0.001, ..., 0.025.
    grid = torch.tensor([i * 0.001 for i in range(26)], dtype=torch.float64)
    torch.testing.assert_close(schedule[:26], grid, rtol=0, atol=1e-15)
    assert schedule[0].item() == 0.0
    assert schedule[-1].item() == 1.0  # exactly
    assert bool((schedule.diff() > 0).all())
    # The quadratic steps grow: the step size increases monotonically after the join.
    assert bool((schedule[25:].diff().diff() > 0).all())


def test_linear_quadratic_schedule_matches_the_paper_formula():
    num_steps, grid_steps = 50, 1000
    num_linear, num_quadratic = 25, 25
    tau = num_linear / grid_steps
    d = num_linear - tau * num_steps
    a = d / (num_linear * num_quadratic**2)
    b = tau / num_linear - 2 * d / num_quadratic**2
    c = a * num_linear**2
    expected = [i * tau / num_linear for i in range(num_linear)]
    expected += [a * i**2 + b * i + c for i in range(num_linear, num_steps + 1)]
    torch.testing.assert_close(
        linear_quadratic_schedule(num_steps, grid_steps),
        torch.tensor(expected, dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )


def test_linear_quadratic_schedule_small_case_by_hand():
    # N = 4: L = Q = 2, tau = 0.002, d = 1.992, a = 0.249, b = -0.995, c = 0.996.
    expected = torch.tensor([0.0, 0.001, 0.002, 0.252, 1.0], dtype=torch.float64)
    torch.testing.assert_close(linear_quadratic_schedule(4), expected, rtol=0, atol=1e-12)


def test_linear_quadratic_join_is_continuous_in_value_and_slope():
    num_steps, join, h = 50, 25.0, 1e-6
    at = lambda i: linear_quadratic_time(torch.tensor(i, dtype=torch.float64), num_steps).item()  # noqa: E731
    # The pieces: f(L) comes from the quadratic, f(L - eps) from the linear part.
    assert at(join) == pytest.approx(0.025, abs=1e-14)
    assert at(join - 1e-12) == pytest.approx(at(join), abs=1e-12)
    left_slope = (at(join) - at(join - h)) / h
    right_slope = (at(join + h) - at(join)) / h
    assert left_slope == pytest.approx(0.001, rel=1e-6)
    assert right_slope == pytest.approx(left_slope, rel=1e-5)
    # Away from the join the quadratic is clearly steeper, so the test above is not vacuous.
    assert (at(40 + h) - at(40)) / h > 10 * left_slope


@pytest.mark.parametrize("num_steps", [2, 3, 5, 10, 49, 50, 100, 1000])
def test_linear_quadratic_schedule_any_length(num_steps):
    schedule = linear_quadratic_schedule(num_steps)
    num_linear = num_steps // 2
    assert schedule.shape == (num_steps + 1,)
    assert schedule[-1].item() == 1.0
    assert bool((schedule.diff() > 0).all())
    grid = torch.arange(num_linear + 1, dtype=torch.float64) / 1000
    torch.testing.assert_close(schedule[: num_linear + 1], grid, rtol=0, atol=1e-15)
    # The analytic end point is 1 before the exact overwrite, too.
    end = linear_quadratic_time(torch.tensor(float(num_steps)), num_steps).item()
    assert end == pytest.approx(1.0, abs=1e-12)


def test_uniform_and_built_schedules():
    torch.testing.assert_close(
        uniform_schedule(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    )
    assert torch.equal(build_schedule("uniform", 7), uniform_schedule(7))
    assert torch.equal(build_schedule("linear_quadratic", 50), linear_quadratic_schedule(50))


def test_schedules_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"linear_quadratic.*uniform"):
        build_schedule("cosine", 50)
    for num_steps in (1, 0, -4):
        with pytest.raises(ValueError, match="num_steps"):
            linear_quadratic_schedule(num_steps)
        with pytest.raises(ValueError, match="num_steps"):
            build_schedule("linear_quadratic", num_steps)
    with pytest.raises(ValueError, match="num_steps"):
        uniform_schedule(0)
    with pytest.raises(ValueError, match="linear_grid_steps"):
        linear_quadratic_schedule(60, linear_grid_steps=50)
    with pytest.raises(TypeError, match="int"):
        linear_quadratic_schedule(50.0)


# ----------------------------------------------------------------------------- solvers


class Recorder:
    """A velocity function that records the times it is called with."""

    def __init__(self, fn):
        self.fn = fn
        self.times: list[torch.Tensor] = []

    def __call__(self, x, t):
        self.times.append(t.clone())
        return self.fn(x, t)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("schedule", ["linear_quadratic", "random"])
def test_solvers_integrate_constant_velocity_exactly(method, schedule):
    grid = linear_quadratic_schedule(50) if schedule == "linear_quadratic" else random_schedule(17)
    x0, velocity = randn(*LATENT_SHAPE), randn(*LATENT_SHAPE, seed=1)
    out = solve(lambda x, t: velocity, x0, grid, method=method)
    torch.testing.assert_close(out, x0 + velocity, rtol=0, atol=1e-12)


def single_point_field(fp: FlowPath, x1: torch.Tensor):
    """The flow-matching velocity when the data is the single point ``x1``:
    ``u(x, t) = (x1 - (1 - s) x) / (1 - (1 - s) t)``."""
    decay = 1 - fp.sigma_min

    def field(x, t):
        t = t.view(-1, *[1] * (x.dim() - 1))
        return (x1 - decay * x) / (1 - decay * t)

    return field


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("num_steps", [2, 7, 50])
def test_solvers_follow_the_straight_flow_path_to_the_data(method, num_steps):
    """The conditional flow-matching field of one data point is exact under Euler on any grid.

    ``u(x, t) = (x1 - (1 - s) x) / (1 - (1 - s) t)`` depends on x; along the path it is
    the constant target, so every step lands back on the path.
    """
    fp = FlowPath(sigma_min=1e-3)
    x0, x1 = randn(*LATENT_SHAPE), randn(*LATENT_SHAPE, seed=1)
    conditional_field = single_point_field(fp, x1)

    for grid in (linear_quadratic_schedule(num_steps), random_schedule(num_steps, seed=3)):
        out = solve(conditional_field, x0, grid, method=method)
        expected = fp.interpolate(x0, x1, torch.ones(LATENT_SHAPE[0], dtype=torch.float64))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
        # ... which is the data up to sigma_min of noise.
        assert (out - x1).abs().max() <= fp.sigma_min * x0.abs().max() + 1e-9
    # The target itself, as a constant field, gets there too.
    out = euler_solve(lambda x, t: fp.velocity_target(x0, x1), x0, random_schedule(num_steps))
    torch.testing.assert_close(out, x1 + fp.sigma_min * x0, rtol=0, atol=1e-12)


def test_heun_is_exact_and_euler_is_a_left_riemann_sum_for_velocity_affine_in_t():
    grid = random_schedule(9, seed=5)
    x0 = randn(2, 3)
    offset, slope = randn(2, 3, seed=1), randn(2, 3, seed=2)

    def affine(x, t):
        return offset + slope * t.view(-1, 1)

    exact = x0 + offset * 1.0 + slope * 0.5  # integral of offset + slope t over [0, 1]
    torch.testing.assert_close(heun_solve(affine, x0, grid), exact, rtol=0, atol=1e-12)

    starts, steps = grid[:-1], grid.diff()
    left_sum = x0 + offset * steps.sum() + slope * (starts * steps).sum()
    euler = euler_solve(affine, x0, grid)
    torch.testing.assert_close(euler, left_sum, rtol=0, atol=1e-12)
    assert (euler - exact).abs().max() > 1e-3  # first order: visibly inexact here


def test_solvers_evaluate_at_the_schedule_times_with_batched_t():
    grid = torch.tensor([0.0, 0.1, 0.4, 1.0], dtype=torch.float64)
    x0 = torch.zeros(5, 2)
    euler = Recorder(lambda x, t: torch.ones_like(x))
    euler_solve(euler, x0, grid)
    assert all(t.shape == (5,) and t.dtype == torch.float32 for t in euler.times)
    assert [t.unique().tolist() for t in euler.times] == [
        [0.0],
        [pytest.approx(0.1)],
        [pytest.approx(0.4)],
    ]

    heun = Recorder(lambda x, t: torch.ones_like(x))
    heun_solve(heun, x0, grid)
    evaluated = [t[0].item() for t in heun.times]
    assert evaluated == pytest.approx([0.0, 0.1, 0.1, 0.4, 0.4, 1.0])


def test_solvers_integrate_between_any_two_times():
    x0, velocity = randn(2, 3), randn(2, 3, seed=1)
    partial = euler_solve(lambda x, t: velocity, x0, [0.2, 0.5, 0.7])
    torch.testing.assert_close(partial, x0 + 0.5 * velocity, rtol=0, atol=1e-12)
    backwards = heun_solve(lambda x, t: velocity, x0, torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(backwards, x0 - velocity, rtol=0, atol=1e-12)


def test_solver_callback_sees_every_step():
    grid = linear_quadratic_schedule(6)
    x0, velocity = randn(2, 3), randn(2, 3, seed=1)
    seen = []
    out = solve(
        lambda x, t: velocity,
        x0,
        grid,
        method="heun",
        callback=lambda i, t, x: seen.append((i, t, x.clone())),
    )
    assert [i for i, _, _ in seen] == list(range(6))
    assert [t for _, t, _ in seen] == grid[1:].tolist()
    for _, t, x in seen:
        torch.testing.assert_close(x, x0 + t * velocity, rtol=0, atol=1e-12)
    assert torch.equal(seen[-1][2], out)


def test_solver_keeps_small_steps_for_bf16_latents():
    # At |x| = 4 bf16 resolves 1/32, so steps of 0.001 would round away in a bf16 state.
    x0 = torch.full((2, 3), 4.0, dtype=torch.bfloat16)
    out = euler_solve(lambda x, t: torch.ones_like(x), x0, linear_quadratic_schedule(50))
    assert out.dtype == torch.bfloat16
    assert bool((out == 5.0).all())


def test_solver_progress_bar(capsys):
    out = solve(
        lambda x, t: torch.ones_like(x), torch.zeros(1, 2), uniform_schedule(3), progress=True
    )
    assert "3/3" in capsys.readouterr().err
    torch.testing.assert_close(out, torch.ones(1, 2))


def test_solvers_reject_bad_input():
    x0 = torch.zeros(2, 3)
    constant = lambda x, t: torch.ones_like(x)  # noqa: E731
    with pytest.raises(ValueError, match=r"euler.*heun"):
        solve(constant, x0, uniform_schedule(4), method="rk4")
    for bad_schedule in ([0.0], torch.zeros(2, 3), [0.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match="schedule"):
            euler_solve(constant, x0, bad_schedule)
    with pytest.raises(ValueError, match="returned shape"):
        heun_solve(lambda x, t: torch.ones(3), x0, uniform_schedule(2))
    with pytest.raises(ValueError, match="batch dimension"):
        euler_solve(constant, torch.tensor(0.0), uniform_schedule(2))
    with pytest.raises(ValueError, match="floating-point"):
        euler_solve(constant, torch.zeros(2, 3, dtype=torch.long), uniform_schedule(2))


def seeded_noise(seed: int = 7):
    """A ``noise_fn`` drawing float64 standard normal noise from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=generator, dtype=torch.float64)


def gaussian_data_velocity(fp: FlowPath, mean: float, std: float):
    """The exact velocity field when the data is ``N(mean, std^2)`` in every coordinate.

    ``X_t = t X_1 + c_t X_0`` with ``c_t = 1 - (1 - s) t`` is Gaussian, so the
    conditional expectations of ``X_1`` and ``X_0`` given ``X_t`` are linear in it.
    """
    decay = 1 - fp.sigma_min

    def velocity(x, t):
        t = t.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        c = 1 - decay * t
        residual = (x - t * mean) / (t * t * std * std + c * c)
        x1 = mean + t * std * std * residual
        noise = c * residual
        return x1 - decay * noise

    return velocity


def test_stochastic_euler_with_eta_zero_is_euler():
    def field(x, t):  # depends on x and t, so the grid matters
        return torch.sin(3 * x) - x * t.view(-1, *[1] * (x.dim() - 1))

    x0, grid = randn(*LATENT_SHAPE), random_schedule(11, seed=2)

    def never(x):
        raise AssertionError("eta = 0 draws no noise")

    out = stochastic_euler_solve(field, x0, grid, eta=0.0, noise_fn=never)
    torch.testing.assert_close(out, euler_solve(field, x0, grid), rtol=0, atol=0)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_stochastic_euler_lands_on_a_single_data_point_whatever_the_noise(eta):
    """With one data point every noise estimate is exactly consistent with it, so the
    renewed noise changes the route but not the end: the data plus sigma_min of noise."""
    fp = FlowPath(sigma_min=1e-3)
    x0, x1 = randn(*LATENT_SHAPE), randn(*LATENT_SHAPE, seed=1)
    field = single_point_field(fp, x1)

    for grid in (linear_quadratic_schedule(20), random_schedule(9, seed=4)):
        route = []
        out = stochastic_euler_solve(
            field,
            x0,
            grid,
            eta=eta,
            noise_fn=seeded_noise(),
            path=fp,
            callback=lambda i, t, x, route=route: route.append((t, x)),
        )
        assert (out - x1).abs().max() <= 10 * fp.sigma_min
        # ... but not along the ODE's route, the path from x0 (Euler follows it
        # exactly here): the noise was renewed on the way.
        ode_route = [
            fp.interpolate(x0, x1, torch.full((LATENT_SHAPE[0],), t, dtype=torch.float64))
            for t, _ in route
        ]
        departure = max(
            (x - on_path).abs().max() for (_, x), on_path in zip(route, ode_route, strict=True)
        )
        assert departure > 0.1


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_stochastic_euler_keeps_the_marginals_of_the_path(eta):
    """Gaussian data with its exact velocity: samples end with the data's mean and std
    (up to the solver's first-order error: at eta = 1 the std is 0.472 after 50
    steps, 0.495 after 400). Renewing ``eta`` of the whole noise scale every step
    instead of ``eta`` of the posterior spread ends at std 0.34 (eta 0.5, 100 steps).
    """
    fp = FlowPath(sigma_min=1e-3)
    mean, std = 2.0, 0.5
    x0 = randn(40_000, 1, seed=3)
    out = stochastic_euler_solve(
        gaussian_data_velocity(fp, mean, std),
        x0,
        uniform_schedule(400),
        eta=eta,
        noise_fn=seeded_noise(5),
        path=fp,
    )
    assert abs(out.mean().item() - mean) < 0.01
    assert abs(out.std().item() - std) < 0.01


def test_stochastic_euler_rejects_bad_input():
    x0 = torch.zeros(2, 3)
    constant = lambda x, t: torch.ones_like(x)  # noqa: E731
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta"):
            stochastic_euler_solve(
                constant, x0, uniform_schedule(3), eta=eta, noise_fn=torch.randn_like
            )
    with pytest.raises(ValueError, match="noise_fn returned shape"):
        stochastic_euler_solve(
            constant, x0, uniform_schedule(3), eta=0.5, noise_fn=lambda x: torch.zeros(3)
        )
    with pytest.raises(ValueError, match="schedule"):
        stochastic_euler_solve(constant, x0, [0.0], eta=0.5, noise_fn=torch.randn_like)


# ----------------------------------------------------------------------------- guidance


class ConditionalModel:
    """``v = w x + b t`` with per-condition w and b; counts calls and refuses a forbidden condition."""

    def __init__(self, forbidden=None):
        self.forbidden = forbidden
        self.batch_sizes: list[int] = []

    def __call__(self, x, t, cond):
        if cond is self.forbidden:
            raise AssertionError("this branch must not be evaluated")
        self.batch_sizes.append(x.shape[0])
        return cond["w"] * x + cond["b"] * t.view(-1, 1)


def make_conditions(batch: int = 4, dim: int = 3):
    cond = {"w": randn(batch, dim, seed=1), "b": randn(batch, dim, seed=2)}
    uncond = {"w": randn(batch, dim, seed=3), "b": randn(batch, dim, seed=4)}
    return cond, uncond


def concat_dicts(cond, uncond):
    return {key: torch.cat([cond[key], uncond[key]]) for key in cond}


def test_cfg_scale_one_is_the_conditional_velocity_without_the_unconditional_branch():
    cond, uncond = make_conditions()
    x, t = randn(4, 3, seed=5), torch.rand(4, dtype=torch.float64)
    model = ConditionalModel(forbidden=uncond)
    for concat in (None, concat_dicts):
        guided = ClassifierFreeGuidance(model, cond, uncond, 1.0, concat=concat)
        assert torch.equal(guided(x, t), model(x, t, cond))
    assert model.batch_sizes == [4, 4, 4, 4]  # one call per guided call, never doubled


def test_cfg_scale_zero_is_the_unconditional_velocity():
    cond, uncond = make_conditions()
    x, t = randn(4, 3, seed=5), torch.rand(4, dtype=torch.float64)
    model = ConditionalModel(forbidden=cond)
    guided = ClassifierFreeGuidance(model, cond, uncond, 0.0)
    assert torch.equal(guided(x, t), model(x, t, uncond))


@pytest.mark.parametrize("scale", [-0.5, 3.5, 7.0])
def test_cfg_combines_the_branches(scale):
    cond, uncond = make_conditions()
    x, t = randn(4, 3, seed=5), torch.rand(4, dtype=torch.float64)
    model = ConditionalModel()
    v_cond = cond["w"] * x + cond["b"] * t.view(-1, 1)
    v_uncond = uncond["w"] * x + uncond["b"] * t.view(-1, 1)
    expected = v_uncond + scale * (v_cond - v_uncond)

    two_calls = ClassifierFreeGuidance(model, cond, uncond, scale)(x, t)
    torch.testing.assert_close(two_calls, expected, rtol=0, atol=1e-12)
    assert model.batch_sizes == [4, 4]

    model.batch_sizes.clear()
    one_call = ClassifierFreeGuidance(model, cond, uncond, scale, concat=concat_dicts)(x, t)
    torch.testing.assert_close(one_call, two_calls, rtol=0, atol=1e-12)
    assert model.batch_sizes == [8]


def test_cfg_drives_a_solver():
    # Constant per-condition velocities: the guided sample moves by the guided velocity.
    v_cond, v_uncond = randn(2, 3, seed=1), randn(2, 3, seed=2)
    model = lambda x, t, cond: cond.expand_as(x)  # noqa: E731
    guided = ClassifierFreeGuidance(
        model, v_cond, v_uncond, 4.0, concat=lambda c, u: torch.cat([c, u])
    )
    x0 = randn(2, 3, seed=3)
    out = solve(guided, x0, linear_quadratic_schedule(10))
    torch.testing.assert_close(out, x0 + v_uncond + 4.0 * (v_cond - v_uncond), rtol=0, atol=1e-12)


def test_cfg_interval_guides_inside_and_is_conditional_only_outside():
    cond, uncond = make_conditions()
    x = randn(4, 3, seed=5)
    scale, interval = 4.0, (0.2, 0.6)
    model = ConditionalModel()
    plain = ClassifierFreeGuidance(model, cond, uncond, scale, concat=concat_dicts)
    limited = ClassifierFreeGuidance(
        model, cond, uncond, scale, concat=concat_dicts, interval=interval
    )
    # Per sample: the times 0.2 and 0.6 are inside (closed interval), 0.1 and 0.9 not.
    t = torch.tensor([0.1, 0.2, 0.6, 0.9], dtype=torch.float64)
    out = limited(x, t)
    torch.testing.assert_close(out[1:3], plain(x, t)[1:3], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[[0, 3]], model(x, t, cond)[[0, 3]], rtol=0, atol=1e-12)

    # A step wholly outside the interval evaluates the conditional branch only.
    never_uncond = ConditionalModel(forbidden=uncond)
    limited = ClassifierFreeGuidance(never_uncond, cond, uncond, scale, interval=interval)
    late = torch.full((4,), 0.8, dtype=torch.float64)
    assert torch.equal(limited(x, late), never_uncond(x, late, cond))
    assert never_uncond.batch_sizes == [4, 4]
    assert "t in [0.2, 0.6]" in repr(limited)
    # The interval [0, 1] is plain guidance.
    every = ClassifierFreeGuidance(model, cond, uncond, scale, interval=(0, 1))
    assert every.interval is None and "t in" not in repr(every)


def test_cfg_interval_drives_a_solver():
    # Constant velocities, uniform grid of 10 steps: the 4 steps starting at
    # t = 0.0 .. 0.3 are guided, the other 6 move with the conditional velocity.
    v_cond, v_uncond = randn(2, 3, seed=1), randn(2, 3, seed=2)
    model = lambda x, t, cond: cond.expand_as(x)  # noqa: E731
    guided = ClassifierFreeGuidance(
        model, v_cond, v_uncond, 4.0, concat=lambda c, u: torch.cat([c, u]), interval=(0, 0.35)
    )
    x0 = randn(2, 3, seed=3)
    out = solve(guided, x0, torch.linspace(0, 1, 11, dtype=torch.float64))
    expected = x0 + 0.4 * (v_uncond + 4.0 * (v_cond - v_uncond)) + 0.6 * v_cond
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("interval", [(0.5, 0.4), (-0.1, 0.5), (0.2, 1.5), (0.1,), "ab"])
def test_cfg_interval_rejects_bad_bounds(interval):
    cond, uncond = make_conditions()
    with pytest.raises(ValueError, match="guidance interval"):
        ClassifierFreeGuidance(ConditionalModel(), cond, uncond, 3.0, interval=interval)


def test_cfg_rejects_bad_input():
    cond, uncond = make_conditions()
    model = ConditionalModel()
    guided = ClassifierFreeGuidance(model, cond, uncond, 5.0)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        guided(randn(4, 3), torch.rand(4, 1))
    for scale in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite"):
            ClassifierFreeGuidance(model, cond, uncond, scale)
    wrong_shape = ClassifierFreeGuidance(lambda x, t, c: x[:, :1], cond, uncond, 5.0)
    with pytest.raises(ValueError, match="returned shape"):
        wrong_shape(randn(4, 3), torch.rand(4))
