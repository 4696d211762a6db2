"""Context parallel (Ulysses) on 2 gloo CPU processes == one process.

One spawn of ``WORLD_SIZE`` workers runs every case (process start-up is most
of the cost); each rank saves what it computed and the tests compare it with
the single-process reference computed here, in fp32 to ``TOLERANCE``.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from moviegen.distributed.context_parallel import (
    ContextParallelSharding,
    UlyssesAttention,
    apply_context_parallel,
)
from moviegen.distributed.spawn import run_spawned
from moviegen.transformer import MovieGenTransformer, TransformerConfig, transformer_recipe
from moviegen.transformer.blocks import Attention
from moviegen.transformer.model import SequenceSharding

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
# A collective that waits longer than this raises in the worker instead of hanging.
COLLECTIVE_TIMEOUT_S = 60.0
# The whole spawn (start-up included) is killed and failed after this long.
SPAWN_TIMEOUT_S = 120.0
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
# Noise on every parameter, so that zero-initialised gates and projections
# do not hide what attention computes.
PERTURBATION = 0.1
BATCH = 2
TEXT_TOKENS = 5
SEED = 0

# Attention cases: (tokens, with a random padded key mask). Odd counts are
# padded by the sharding; with one token, rank 1 holds nothing but padding.
ATTENTION_CASES = {
    "even": (8, False),
    "even-masked": (8, True),
    "odd": (7, False),
    "odd-masked": (7, True),
    "one-token": (1, False),
}
# Model cases: latent (T, H, W) and its real (unpadded) size per sample, or
# None for no video_mask. Patch (1, 2, 2): (3, 4, 6) is 18 tokens, (3, 2, 6) 9.
MODEL_CASES = {
    "even-padded": ((3, 4, 6), [(3, 4, 6), (2, 4, 4)]),
    "odd-padded": ((3, 2, 6), [(2, 2, 6), (3, 2, 2)]),
    "odd-unmasked": ((3, 2, 6), None),
}
# Also run on a deep copy of the context-parallel model (as an EMA shadow would be).
COPIED_MODEL_CASE = "odd-padded"
# A head count that degree 2 cannot split (dim 32 still divides by it).
INDIVISIBLE_HEADS = 1


def debug_config(**changes) -> TransformerConfig:
    return dataclasses.replace(transformer_recipe("debug"), **changes)


def perturb(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(PERTURBATION * torch.randn_like(parameter))
    return module


# ----------------------------------------------------------------------------- the cases


def attention_case(name: str) -> tuple[Attention, dict[str, torch.Tensor]]:
    """A perturbed self-attention and its inputs: tokens ``x`` ``(B, N, D)``,
    key mask ``(B, N)`` or None, output gradient ``(B, N, D)``."""
    num_tokens, masked = ATTENTION_CASES[name]
    config = debug_config()
    torch.manual_seed(SEED)
    attention = perturb(Attention(config))
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH, num_tokens, config.dim, generator=generator)
    keys = None
    if masked:
        keys = torch.rand(BATCH, num_tokens, generator=generator) > 0.5
        keys[:, 0] = True  # every sample keeps a real key
    out_grad = torch.randn(BATCH, num_tokens, config.dim, generator=generator)
    return attention, {"x": x, "keys": keys, "out_grad": out_grad}


def model_case(name: str) -> tuple[MovieGenTransformer, dict[str, torch.Tensor | None]]:
    """A perturbed debug model and one training step's inputs and target."""
    latent_shape, real_shapes = MODEL_CASES[name]
    config = debug_config()
    torch.manual_seed(SEED)
    model = perturb(MovieGenTransformer(config))
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH, config.latent_channels, *latent_shape, generator=generator)
    target = torch.randn(x.shape, generator=generator)
    t = torch.rand(BATCH, generator=generator)
    context = torch.randn(BATCH, TEXT_TOKENS, config.dim, generator=generator)
    context_mask = torch.ones(BATCH, TEXT_TOKENS, dtype=torch.bool)
    context_mask[1, TEXT_TOKENS // 2 :] = False  # padded text too
    video_mask = None
    if real_shapes is not None:
        video_mask = torch.zeros(BATCH, *latent_shape, dtype=torch.bool)
        for index, (frames, height, width) in enumerate(real_shapes):
            video_mask[index, :frames, :height, :width] = True
    inputs = {
        "x": x,
        "t": t,
        "context": context,
        "context_mask": context_mask,
        "video_mask": video_mask,
        "target": target,
    }
    return model, inputs


def attention_step(attention: Attention, case: dict, sharding: SequenceSharding) -> dict:
    """Forward + backward of self-attention on the tokens ``sharding`` keeps."""
    x = case["x"].clone().requires_grad_(True)
    num_tokens = x.shape[1]
    no_positions = torch.zeros(num_tokens, x.shape[2])
    local, _, keys = sharding.shard(x, no_positions, case["keys"])
    key_mask = None if keys is None else keys[:, None, None, :]
    out = sharding.gather(attention(local, local, key_mask), num_tokens)  # (B, N, D)
    (out * case["out_grad"]).sum().backward()
    grads = {name: p.grad for name, p in attention.named_parameters()}
    return {"out": out.detach(), "x_grad": x.grad, "grads": grads}


def model_step(model: MovieGenTransformer, case: dict) -> dict:
    """Forward + backward of the flow-matching MSE over real latent positions."""
    x = case["x"].clone().requires_grad_(True)
    context = case["context"].clone().requires_grad_(True)
    video_mask = case["video_mask"]
    velocity = model(x, case["t"], context, case["context_mask"], video_mask)
    weight = torch.ones_like(velocity) if video_mask is None else video_mask[:, None].expand_as(x)
    weight = weight.to(velocity.dtype)
    loss = ((velocity - case["target"]) ** 2 * weight).sum() / weight.sum()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {
        "out": velocity.detach(),
        "loss": loss.detach(),
        "x_grad": x.grad,
        "context_grad": context.grad,
        "grads": grads,
    }


# ----------------------------------------------------------------------------- the workers


def all_reduce_grads(result: dict) -> dict:
    """Sum each rank's partial gradients over the CP group (see context_parallel)."""
    for key, value in result.items():
        if key.endswith("_grad"):
            dist.all_reduce(value)
    for grad in result["grads"].values():
        dist.all_reduce(grad)
    return result


def check_bad_inputs(rank: int) -> dict:
    """Outcomes of apply_context_parallel on inputs it must refuse or ignore."""
    outcomes = {}
    model = MovieGenTransformer(debug_config(num_heads=INDIVISIBLE_HEADS))
    try:
        apply_context_parallel(model, dist.group.WORLD)
        outcomes["heads_error"] = "no error"
    except ValueError as error:
        outcomes["heads_error"] = str(error)
    outcomes["heads_untouched"] = type(model.sequence_sharding) is SequenceSharding
    # Degree 1: every rank in a group of its own.
    singletons = [dist.new_group([member]) for member in range(WORLD_SIZE)]
    model = MovieGenTransformer(debug_config())
    apply_context_parallel(model, singletons[rank])
    outcomes["degree_one_untouched"] = type(model.sequence_sharding) is SequenceSharding and all(
        block.self_attn.attention_fn is torch.nn.functional.scaled_dot_product_attention
        for block in model.blocks
    )
    return outcomes


def worker(rank: int) -> dict:
    """Every case on this rank of the spawned group."""
    group = dist.group.WORLD
    results: dict = {"attention": {}, "model": {}}
    for name in ATTENTION_CASES:
        attention, case = attention_case(name)
        attention.attention_fn = UlyssesAttention(group)
        step = attention_step(attention, case, ContextParallelSharding(group))
        results["attention"][name] = all_reduce_grads(step)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,), mesh_dim_names=("cp",))
    for name in MODEL_CASES:
        model, case = model_case(name)
        apply_context_parallel(model, mesh)
        results["model"][name] = all_reduce_grads(model_step(model, case))
    # A deep copy (e.g. an EMA shadow) keeps running context parallel.
    model, case = model_case(COPIED_MODEL_CASE)
    apply_context_parallel(model, mesh)
    results["copy"] = model_step(copy.deepcopy(model), case)["out"]
    results["bad_inputs"] = check_bad_inputs(rank)
    return results


@pytest.fixture(scope="module")
def cp_results() -> list[dict]:
    """Every rank's results of one spawn of ``WORLD_SIZE`` gloo workers."""
    return run_spawned(
        worker,
        world_size=WORLD_SIZE,
        timeout_s=SPAWN_TIMEOUT_S,
        collective_timeout_s=COLLECTIVE_TIMEOUT_S,
    )


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same(actual[key], value)
        else:
            torch.testing.assert_close(actual[key], value, **TOLERANCE, msg=key)


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_ulysses_attention_matches_full_attention(cp_results, name):
    attention, case = attention_case(name)
    expected = attention_step(attention, case, SequenceSharding())
    for rank, results in enumerate(cp_results):
        actual = results["attention"][name]
        assert actual["out"].shape == case["x"].shape, f"rank {rank}"
        assert_same(actual, expected)


@pytest.mark.parametrize("name", MODEL_CASES)
def test_context_parallel_model_matches_single_process(cp_results, name):
    model, case = model_case(name)
    expected = model_step(model, case)
    for results in cp_results:
        assert_same(results["model"][name], expected)
    # The mask matters here: without it, padding would change the real outputs.
    video_mask = case["video_mask"]
    if video_mask is not None:
        with torch.no_grad():
            unmasked = model(case["x"], case["t"], case["context"], case["context_mask"])
        real = video_mask[:, None].expand_as(unmasked)
        assert not torch.allclose(unmasked[real], expected["out"][real], **TOLERANCE)


def test_deep_copied_model_stays_context_parallel(cp_results):
    model, case = model_case(COPIED_MODEL_CASE)
    expected = model_step(model, case)["out"]
    for results in cp_results:
        torch.testing.assert_close(results["copy"], expected, **TOLERANCE)


def test_heads_not_divisible_by_degree_is_a_value_error(cp_results):
    for results in cp_results:
        outcomes = results["bad_inputs"]
        assert (
            "num_heads (1) must be a multiple of the context-parallel degree (2)"
            in (outcomes["heads_error"])
        )
        assert outcomes["heads_untouched"], "a refused model must be left as it was"


def test_degree_one_is_a_no_op(cp_results):
    assert all(results["bad_inputs"]["degree_one_untouched"] for results in cp_results)


def test_wrong_argument_types_are_type_errors():
    model = MovieGenTransformer(debug_config())
    with pytest.raises(TypeError, match="DeviceMesh or a ProcessGroup"):
        apply_context_parallel(model, "cp")
    with pytest.raises(TypeError, match="must be a MovieGenTransformer"):
        apply_context_parallel(nn.Linear(1, 1), dist.group.WORLD)
