"""Memory and throughput planner: sharding, context parallel, checkpointing, FLOPs,
bad input, the CLI, and the estimate against peak memory measured on the CPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from moviegen.cli import main
from moviegen.distributed.planner import (
    GIB,
    PRECISIONS,
    VALIDATION_CASES,
    TrainingSetup,
    ValidationResult,
    activation_memory,
    format_validation,
    measure_cpu_peak_memory,
    plan_training,
)
from moviegen.transformer import count_parameters, train_step_flops, transformer_recipe
from moviegen.transformer.blocks import TransformerBlock
from moviegen.transformer.flops import layer_flops

PAPER_TOKENS = 73_728
SHARDED = ("parameters", "gradients", "optimizer", "ema", "optimizer_step")
# The CPU acceptance: the plan's peak within this fraction of the measured one.
VALIDATION_TOLERANCE = 0.25


def plan_30b(**setup):
    return plan_training("30B", num_video_tokens=PAPER_TOKENS, **setup)


def test_parameter_memory_of_30b_on_one_gpu():
    params = count_parameters("30B")
    assert abs(params - 29.26e9) < 0.01e9
    for precision in ("bf16-mixed", "fp32"):
        plan = plan_30b(num_gpus=1, precision=precision)
        assert plan.parameters.total == params
        # fp32 master weights, 4 bytes each, in both precisions.
        assert plan.components["parameters"] == params * PRECISIONS[precision].master_bytes
        assert plan.components["optimizer"] == params * 8
        assert plan.components["gradients"] == params * 4
        assert plan.components["ema"] == params * 4


def test_sharded_states_scale_inversely_with_gpus():
    plans = {gpus: plan_30b(num_gpus=gpus, activation_checkpointing="full") for gpus in (8, 64)}
    for name in SHARDED:
        assert plans[8].components[name] == pytest.approx(8 * plans[64].components[name])
    # Activations are per sample, not sharded over data-parallel ranks.
    assert plans[8].components["activations"] == plans[64].components["activations"]
    assert plans[64].peak < plans[8].peak


def test_context_parallel_divides_activations_and_not_states():
    one = plan_30b(num_gpus=64, context_parallel=1)
    four = plan_30b(num_gpus=64, context_parallel=4)
    ratio = one.components["activations"] / four.components["activations"]
    # Everything but the text keys/values (not sequence-sharded) is divided by 4.
    assert 3.95 < ratio <= 4.0
    assert one.components["workspace"] == pytest.approx(4 * four.components["workspace"])
    # States are sharded over gpus / cp = 16 data-parallel ranks instead of 64.
    assert four.components["parameters"] == pytest.approx(4 * one.components["parameters"])
    assert four.setup.data_parallel == 16
    # Gathering the full-length K and V only costs something with CP.
    assert one.components["cp_buffers"] == 0 < four.components["cp_buffers"]
    # Folding the CP ranks into the FSDP mesh shards the states over all 64 GPUs.
    folded = plan_30b(num_gpus=64, context_parallel=4, shard_across_cp=True)
    for name in SHARDED:
        assert folded.components[name] == pytest.approx(one.components[name])
    assert folded.components["activations"] == four.components["activations"]
    assert folded.tokens_per_step == four.tokens_per_step == 16 * PAPER_TOKENS


def test_activation_checkpointing_orders_memory_and_flops():
    plans = {
        ac: plan_30b(num_gpus=64, context_parallel=2, activation_checkpointing=ac)
        for ac in ("none", "selective", "full")
    }
    kept = {ac: plan.components["activations"] for ac, plan in plans.items()}
    assert kept["full"] < kept["selective"] < kept["none"]
    assert plans["full"].peak < plans["selective"].peak < plans["none"].peak
    assert plans["none"].components["recompute"] == 0 < plans["selective"].components["recompute"]
    # Full checkpointing re-runs every block's forward; selective only cheap elementwise ops.
    config = transformer_recipe("30B")
    recompute = config.num_layers * layer_flops(config, PAPER_TOKENS, 640) / 2
    assert plans["full"].executed_flops == pytest.approx(plans["none"].executed_flops + recompute)
    assert plans["selective"].executed_flops == plans["none"].executed_flops


def test_the_30b_answer_on_80gb_gpus():
    # Documented in docs/BENCHMARKS.md: 64 GPUs fit with CP 2 and full checkpointing,
    # not without checkpointing and not without CP.
    assert plan_30b(num_gpus=64, context_parallel=2, activation_checkpointing="full").fits
    assert not plan_30b(num_gpus=64, context_parallel=2, activation_checkpointing="none").fits
    assert not plan_30b(num_gpus=64, context_parallel=1, activation_checkpointing="full").fits
    # No sharding at all (dp = 1): 20 bytes per parameter of states alone.
    assert not plan_30b(num_gpus=8, context_parallel=8, activation_checkpointing="full").fits


def test_throughput_follows_train_step_flops():
    config = transformer_recipe("5B")
    plan = plan_training(
        "5B",
        num_gpus=16,
        context_parallel=4,
        num_video_tokens=4096,
        num_text_tokens=128,
        micro_batch_size=2,
        grad_accum=3,
        mfu=0.5,
        peak_flops=1e15,
    )
    per_sample = train_step_flops(config, 4096, 128)
    assert plan.model_flops == pytest.approx(per_sample * 2 * 3 / 4)
    assert plan.step_seconds == pytest.approx(plan.executed_flops / (1e15 * 0.5))
    assert plan.tokens_per_step == 2 * 3 * 4 * 4096  # micro-batch x accum x dp x tokens
    assert plan.tokens_per_second == pytest.approx(plan.tokens_per_step / plan.step_seconds)
    assert plan.model_mfu == pytest.approx(0.5)


def test_options_that_add_memory():
    base = plan_30b(num_gpus=64, context_parallel=2, activation_checkpointing="full")
    no_ema = plan_30b(num_gpus=64, context_parallel=2, activation_checkpointing="full", ema=False)
    assert base.peak - no_ema.peak == pytest.approx(base.parameters.total / 32 * 4)
    extra = plan_30b(
        num_gpus=64, context_parallel=2, activation_checkpointing="full", extra_memory_gib=20
    )
    assert extra.peak - base.peak == pytest.approx(20 * GIB)
    assert base.fits and not extra.fits
    # With gradient accumulation, all gradients are live during backward.
    accum = plan_30b(num_gpus=64, context_parallel=2, activation_checkpointing="full", grad_accum=2)
    assert accum.gradients_at_backward_peak == accum.components["gradients"]
    assert base.gradients_at_backward_peak < base.components["gradients"]
    # Math attention materialises N x N probabilities.
    math = plan_training("debug", attention="math", num_video_tokens=512)
    flash = plan_training("debug", attention="flash", num_video_tokens=512)
    assert math.components["activations"] > flash.components["activations"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"num_gpus": 0}, "num_gpus must be a positive integer"),
        ({"num_gpus": 64, "context_parallel": 3}, "must divide the number of GPUs"),
        ({"gpu_memory_gib": -80}, "gpu memory must be positive"),
        ({"extra_memory_gib": -1}, "extra memory must be >= 0"),
        ({"activation_checkpointing": "some"}, "activation checkpointing must be one of"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"attention": "ring"}, "attention must be one of"),
        ({"num_video_tokens": 0}, "num_video_tokens must be a positive integer"),
        ({"num_video_tokens": 80_000}, "more than the 30B position tables cover"),
        ({"num_gpus": 4, "context_parallel": 4, "num_video_tokens": 73_726}, "split evenly"),
        ({"mfu": 1.5}, "mfu must be in"),
    ],
)
def test_bad_input_is_a_clear_value_error(setup, message):
    with pytest.raises(ValueError, match=message):
        plan_training("30B", **setup)


def test_unknown_recipe_and_unknown_option():
    with pytest.raises(ValueError, match="unknown transformer recipe '31B'"):
        plan_training("31B")
    with pytest.raises(TypeError):
        plan_training("30B", num_gpu=8)


def test_block_activations_match_saved_tensors():
    """The per-block count equals what autograd saves, tensor by tensor (CPU kernels)."""
    config = dataclasses.replace(
        transformer_recipe("debug"), dim=64, num_heads=2, ffn_dim=96, num_layers=1
    )
    batch, tokens, text = 2, 64, 12
    torch.manual_seed(0)
    block = TransformerBlock(config)
    block.init_weights()
    x = torch.randn(batch, tokens, config.dim, requires_grad=True)
    modulation = torch.randn(batch, 6, config.dim, requires_grad=True)
    context = torch.randn(batch, text, config.dim, requires_grad=True)
    cross_mask = torch.ones(batch, 1, 1, text, dtype=torch.bool)
    has_context = torch.ones(batch, 1, 1)
    # The context is shared by all blocks (counted outside them); parameters are states.
    excluded = {p.untyped_storage().data_ptr() for p in block.parameters()}
    excluded.add(context.untyped_storage().data_ptr())

    for attention, kernel in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
        saved: dict[int, int] = {}

        def pack(tensor, saved=saved):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in excluded:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        with hooks, sdpa_kernel(kernel):
            block(x, modulation, context, None, cross_mask, has_context)
        setup = TrainingSetup(
            precision="fp32",
            attention=attention,
            fused_norm=False,
            micro_batch_size=batch,
            num_text_tokens=text,
        )
        expected = activation_memory(config, setup, tokens).block_full
        assert sum(saved.values()) == pytest.approx(expected, rel=0.02), attention


class _OutputsOf(TorchDispatchMode):
    """Bytes of the distinct output storages of the given aten ops."""

    def __init__(self, ops):
        super().__init__()
        self.ops = ops
        self.outputs: dict[int, int] = {}
        self.alive: list[torch.Tensor] = []  # so no storage address is reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.ops:
            for tensor in out if isinstance(out, tuple) else (out,):
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    self.outputs[storage.data_ptr()] = storage.nbytes()
                    self.alive.append(tensor)
        return out


def test_selective_checkpointing_keeps_matmul_and_attention_outputs():
    """Selective AC keeps the block input and what its matmuls and attention
    kernels return (the outputs a mm/SDPA checkpoint policy would save)."""
    config = dataclasses.replace(
        transformer_recipe("debug"), dim=64, num_heads=2, ffn_dim=96, num_layers=1
    )
    batch, tokens, text = 2, 64, 12
    block = TransformerBlock(config)
    block.init_weights()
    x = torch.randn(batch, tokens, config.dim)
    aten = torch.ops.aten
    mode = _OutputsOf(
        {aten.mm, aten.addmm, aten.bmm, aten._scaled_dot_product_flash_attention_for_cpu}
    )
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION), mode:
        block(
            x,
            torch.randn(batch, 6, config.dim),
            torch.randn(batch, text, config.dim),
            None,
            torch.ones(batch, 1, 1, text, dtype=torch.bool),
            torch.ones(batch, 1, 1),
        )
    kept = x.untyped_storage().nbytes() + sum(mode.outputs.values())
    setup = TrainingSetup(
        precision="fp32",
        activation_checkpointing="selective",
        micro_batch_size=batch,
        num_text_tokens=text,
    )
    assert activation_memory(config, setup, tokens).block_kept == pytest.approx(kept, rel=1e-6)


def test_cli_prints_a_table_and_json(capsys):
    argv = ["plan", "--recipe", "30B", "--gpus", "64", "--cp", "2", "--ac", "full"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "peak per GPU" in table
    assert "64 GPUs = 32 data-parallel x 2 context-parallel" in table
    assert "yes" in table.split("fits")[-1].splitlines()[0]

    assert main([*argv, "--tokens", "73728", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is True
    assert report["setup"]["data_parallel"] == 32
    assert report["peak_gib"] == pytest.approx(
        max(report["backward_peak_gib"], report["step_peak_gib"])
    )
    assert report["usable_gib"] == pytest.approx(80 * 0.95 - 4)

    assert main([*argv[:-2], "--ac", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--recipe", "31B"], "unknown transformer recipe"),
        (["plan"], "plan needs --recipe"),
        (["plan", "--recipe", "30B", "--gpus", "0"], "num_gpus must be a positive integer"),
        (["plan", "--recipe", "30B", "--gpus", "8", "--cp", "3"], "must divide"),
        (["plan", "--recipe", "30B", "--gpu-memory", "-1"], "gpu memory must be positive"),
    ],
)
def test_cli_bad_input(argv, message, capsys):
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("moviegen: error:") and message in error


def test_validation_table_formats_results():
    case = VALIDATION_CASES[0]
    results = [ValidationResult(case, estimate=110 * 2**20, measured=100 * 2**20)]
    table = format_validation(results)
    assert case.name in table and "1.10" in table
    assert results[0].to_dict()["ratio"] == pytest.approx(1.1)


@pytest.mark.slow
@pytest.mark.parametrize("case", VALIDATION_CASES, ids=lambda case: case.name)
def test_plan_matches_measured_cpu_peak(case):
    """Train the case for two steps in a fresh process; the plan (one device,
    fp32, no checkpointing, CPU kernels) must be within 25% of the peak."""
    plan = case.plan()
    measured = measure_cpu_peak_memory(case)
    # Big enough that the model, not interpreter noise, sets the peak.
    assert measured > 150 * 2**20
    assert abs(plan.peak / measured - 1) <= VALIDATION_TOLERANCE, (
        f"{case.name}: estimate {plan.peak / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    )
