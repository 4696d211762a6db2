"""Movie Gen transformer: token layout, masks, adaLN-single, sizes, FLOPs, learning."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moviegen.transformer import (
    TRANSFORMER_RECIPES,
    MovieGenTransformer,
    TransformerConfig,
    count_parameters,
    describe,
    forward_flops,
    num_video_tokens,
    train_step_flops,
    transformer_recipe,
)
from moviegen.transformer.blocks import TransformerBlock
from moviegen.transformer.flops import layer_flops

CHANNELS = 16
TEXT_TOKENS = 5


def debug_config(**changes) -> TransformerConfig:
    return dataclasses.replace(transformer_recipe("debug"), **changes)


def perturbed_model(config: TransformerConfig | None = None, seed: int = 0) -> MovieGenTransformer:
    """A debug model with noise on every parameter, so that zero-initialised
    gates and projections no longer hide what the rest of the network does."""
    torch.manual_seed(seed)
    model = MovieGenTransformer(config or debug_config()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def inputs(
    batch: int, frames: int, height: int, width: int, *, text: int = TEXT_TOKENS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, frames, height, width, generator=generator)
    t = torch.rand(batch, generator=generator)
    context = torch.randn(batch, text, 32, generator=generator)
    context_mask = torch.ones(batch, text, dtype=torch.bool)
    return x, t, context, context_mask


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These tensors are tiny; on a shared 2-core machine, OpenMP workers
    waiting for busy cores made every step ~20x slower than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> MovieGenTransformer:
    return perturbed_model()


# ----------------------------------------------------------------------------- shapes and layout


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 2, 2), (2, 1, 4, 6), (2, 3, 4, 8), (1, 2, 10, 4), (1, 8, 16, 16)],
    ids=["image-1-token", "image-nonsquare", "video", "tall", "max-tables"],
)
def test_output_has_input_shape(model, shape):
    x, t, context, mask = inputs(*shape)
    with torch.no_grad():
        out = model(x, t, context, mask)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_position_embedding_is_laid_out_t_h_w():
    torch.manual_seed(0)
    model = MovieGenTransformer(debug_config())
    table = model.position_embed
    grid = (3, 2, 5)  # H != W: swapping the h and w tables would read wrong rows
    positions = table(grid)
    assert positions.shape == (3 * 2 * 5, 32)
    for t in range(3):
        for h in range(2):
            for w in range(5):
                expected = table.frames[t] + table.rows[h] + table.columns[w]
                assert torch.equal(positions[(t * 2 + h) * 5 + w], expected), (t, h, w)


def test_sincos_position_init_tells_every_token_apart():
    config = dataclasses.replace(debug_config(), dim=48, max_latent_frames=4, max_latent_height=8)
    table = MovieGenTransformer(config).position_embed
    grid = (4, 4, 4)
    positions = table(grid)  # (64, 48)
    distances = torch.cdist(positions, positions)
    off_diagonal = distances[~torch.eye(len(positions), dtype=torch.bool)]
    assert off_diagonal.min() > 0.1  # no two tokens start at the same position
    # Each axis lives in its own third of the channels: (t, h) != (h, t).
    for axis, values in enumerate((table.frames, table.rows, table.columns)):
        third = slice(16 * axis, 16 * (axis + 1))
        assert values[:, third].abs().sum() > 0
        assert torch.count_nonzero(values) == torch.count_nonzero(values[:, third])
    # Still learnable, and the plain option keeps small noise.
    assert table.rows.requires_grad
    noise = MovieGenTransformer(dataclasses.replace(config, position_init="normal")).position_embed
    assert 0.005 < noise.rows.std() < 0.03
    with pytest.raises(ValueError, match="position_init"):
        dataclasses.replace(config, position_init="rope")


def test_patch_tokens_follow_t_h_w_order(model):
    x = inputs(2, 2, 4, 6)[0]
    tokens = model.patch_embed(x)
    # Manual patchify: cut non-overlapping (1, 2, 2) patches, flatten them in
    # (t, h, w) order and apply the convolution as the matrix it is.
    patches = rearrange(x, "b c (t a) (h p) (w q) -> b (t h w) (c a p q)", a=1, p=2, q=2)
    weight = model.patch_embed.proj.weight.flatten(1)  # (D, C * 4)
    expected = patches @ weight.T + model.patch_embed.proj.bias
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)


def test_unpatchify_places_each_token_at_its_patch(model):
    x = inputs(2, 3, 4, 6)[0]
    patches = rearrange(x, "b c (t a) (h p) (w q) -> b (t h w) (a p q c)", a=1, p=2, q=2)
    assert torch.equal(model.unpatchify(patches, (3, 2, 3)), x)


def test_positions_are_added_to_the_input_of_every_block(model):
    x, t, context, mask = inputs(1, 2, 4, 6)
    positions = model.position_embed(model.token_grid((2, 4, 6)))
    seen_inputs, seen_outputs = [], []

    def record(_module, args, output) -> None:
        seen_inputs.append(args[0])
        seen_outputs.append(output)

    handles = [block.register_forward_hook(record) for block in model.blocks]
    try:
        with torch.no_grad():
            model(x, t, context, mask)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen_inputs) == model.config.num_layers == 2
    tokens = model.patch_embed(x)
    torch.testing.assert_close(seen_inputs[0], tokens + positions)
    torch.testing.assert_close(seen_inputs[1], seen_outputs[0] + positions)


# ----------------------------------------------------------------------------- masks


def test_padded_video_tokens_do_not_change_real_outputs(model):
    # Two samples of different real sizes, padded into one (B, C, 4, 6, 8) batch
    # with garbage and masked as keys; each must match its unpadded run.
    real_shapes = [(2, 4, 6), (3, 6, 4)]
    batch_x, t, context, mask = inputs(2, 4, 6, 8, seed=1)
    batch_x = batch_x * 50  # loud garbage in the padding
    video_mask = torch.zeros(2, 4, 6, 8, dtype=torch.bool)
    alone = []
    for index, (frames, height, width) in enumerate(real_shapes):
        x = inputs(1, frames, height, width, seed=2 + index)[0]
        batch_x[index, :, :frames, :height, :width] = x[0]
        video_mask[index, :frames, :height, :width] = True
        with torch.no_grad():
            alone.append(model(x, t[index : index + 1], context[index : index + 1], mask[:1]))
    with torch.no_grad():
        together = model(batch_x, t, context, mask, video_mask)
        unmasked = model(batch_x, t, context, mask)
    for index, (frames, height, width) in enumerate(real_shapes):
        real = together[index, :, :frames, :height, :width]
        torch.testing.assert_close(real, alone[index][0], atol=1e-5, rtol=1e-5)
        # Without the mask the garbage does leak in (the test can fail).
        assert not torch.allclose(unmasked[index, :, :frames, :height, :width], alone[index][0])


def test_a_patch_is_real_only_when_all_its_positions_are(model):
    video_mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    video_mask[0, 0, 3, 0] = False  # one latent position of the bottom-left patch
    assert model.patch_mask(video_mask).tolist() == [[True, True, False, True]]


def test_padded_text_tokens_do_not_change_outputs(model):
    x, t, context, mask = inputs(2, 2, 4, 4)
    padded = torch.cat([context, 100 * torch.randn(2, 3, 32)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        reference = model(x, t, context, mask)
        out = model(x, t, padded, padded_mask)
        leaky = model(x, t, padded, torch.ones_like(padded_mask))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky, reference)


def test_sample_without_text_is_finite_and_ignores_context(model):
    x, t, context, mask = inputs(2, 2, 4, 4)
    mask[1] = False  # dropped caption for the second sample only
    with torch.no_grad():
        out = model(x, t, context, mask)
        other_context = model(x, t, torch.randn_like(context), mask)
        alone = model(x[:1], t[:1], context[:1], mask[:1])
    assert torch.isfinite(out).all()
    # No keys -> cross-attention contributes nothing, whatever the context holds.
    torch.testing.assert_close(out[1], other_context[1])
    assert not torch.allclose(out[0], other_context[0]), "text must matter when present"
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- pooled text


def test_pooled_text_starts_as_a_no_op_and_adds_mean_text_to_the_timestep_embedding():
    plain = perturbed_model()
    torch.manual_seed(1)
    pooled = MovieGenTransformer(debug_config(pooled_text=True)).eval()
    loaded = pooled.load_state_dict(plain.state_dict(), strict=False)
    assert {key.split(".")[0] for key in loaded.missing_keys} == {"text_pool"}
    assert not loaded.unexpected_keys
    x, t, context, mask = inputs(2, 2, 4, 4)
    no_keys = torch.zeros_like(mask)
    with torch.no_grad():
        # Zero-initialised output layer: the same model as without the option.
        torch.testing.assert_close(pooled(x, t, context, mask), plain(x, t, context, mask))

        pool = pooled.text_pool
        pool.fc2.weight.normal_(std=0.1)
        mean = context.mean(dim=1)  # every token real
        expected = pool.fc2(torch.nn.functional.silu(pool.fc1(mean)))
        torch.testing.assert_close(pool(context, mask), expected)
        # Through the modulation the caption reaches the output even where
        # cross-attention has no keys, i.e. contributes nothing.
        torch.testing.assert_close(plain(x, t, context, no_keys), plain(x, t, 2 * context, no_keys))
        embedding = pooled.timestep_embed(t) + pool(context, mask)
        assert not torch.allclose(embedding, pooled.timestep_embed(t))
        assert not torch.allclose(
            pooled(x, t, context, mask), pooled(x, t, 2 * context, mask), atol=1e-4
        )


def test_pooled_text_ignores_padded_and_dropped_text():
    model = perturbed_model(debug_config(pooled_text=True))
    x, t, context, mask = inputs(2, 2, 4, 4)
    padded = torch.cat([context, 100 * torch.randn(2, 3, 32)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(
            model.text_pool(padded, padded_mask), model.text_pool(context, mask)
        )
        torch.testing.assert_close(
            model(x, t, padded, padded_mask), model(x, t, context, mask), atol=1e-5, rtol=1e-5
        )
        # A dropped caption pools to zero: its vector is the MLP's "no caption".
        dropped = torch.zeros_like(mask)
        nothing = model.text_pool(torch.randn_like(context), dropped)
        torch.testing.assert_close(nothing, model.text_pool(context, dropped))
        torch.testing.assert_close(nothing, model.text_pool(torch.zeros_like(context), mask))


def test_empty_masks_still_give_every_attention_a_key(model):
    # Some SDPA backends (and older PyTorch) return NaN for a query with no
    # key; the model must never ask them to, whatever the backend does.
    x, t, context, mask = inputs(2, 2, 4, 4)
    mask[0] = False
    video_mask = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    video_mask[1] = False
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _module, args: seen.append(args))
    x.requires_grad_(True)
    try:
        model(x, t, context, mask, video_mask).square().sum().backward()
    finally:
        handle.remove()
    _, _, _, self_mask, cross_mask, has_context = seen[0]
    assert self_mask.shape == (2, 1, 1, 8) and cross_mask.shape == (2, 1, 1, TEXT_TOKENS)
    assert self_mask.any(dim=-1).all() and cross_mask.any(dim=-1).all()
    assert has_context.flatten().tolist() == [0.0, 1.0]
    assert torch.isfinite(x.grad).all()


def test_sample_without_real_video_tokens_is_finite(model):
    x, t, context, mask = inputs(2, 2, 4, 4)
    video_mask = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    video_mask[0] = False
    with torch.no_grad():
        out = model(x, t, context, mask, video_mask)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- architecture


def test_block_linears_have_no_bias(model):
    linears = [module for module in model.blocks.modules() if isinstance(module, nn.Linear)]
    assert len(linears) == model.config.num_layers * (4 + 4 + 3)
    assert all(linear.bias is None for linear in linears)


def test_adaln_single_shares_one_timestep_projection():
    config = transformer_recipe("tiny")
    model = MovieGenTransformer(config)
    d, f = config.dim, config.ffn_dim
    six_d = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == 6 * d
    ]
    assert six_d == ["timestep_modulation"], "exactly one shared Linear(d, 6d)"
    # A block: 4 attention matrices twice, SwiGLU, the cross-attention norm
    # weight and the (6, d) modulation table; nothing of size d * 6d.
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    assert per_block == 8 * d * d + 3 * d * f + d + 6 * d
    assert model.blocks[0].modulation.shape == (6, d)
    assert isinstance(model.blocks, nn.ModuleList)
    assert all(type(block) is MovieGenTransformer.block_class for block in model.blocks)
    assert MovieGenTransformer.block_class is TransformerBlock


def analytic_parameter_count(config: TransformerConfig) -> int:
    d, f, c = config.dim, config.ffn_dim, config.latent_channels
    patch = config.patch_volume * c
    qk = 2 * 2 * config.head_dim if config.qk_norm else 0
    block = 8 * d * d + 3 * d * f + d + 6 * d + qk
    embeddings = patch * d + d + sum(config.position_table_sizes) * d
    timestep = config.timestep_embed_dim * d + d + d * d + d + d * 6 * d + 6 * d
    final = 2 * d + d * patch + patch
    pooled = 2 * (d * d + d) if config.pooled_text else 0  # the pooled-text MLP
    return embeddings + timestep + pooled + config.num_layers * block + final


def test_30b_has_29_to_31_billion_parameters():
    config = transformer_recipe("30B")
    shape = (config.num_layers, config.dim, config.ffn_dim, config.num_heads)
    assert shape == (48, 6144, 16384, 48)
    count = count_parameters("30B")
    assert 29e9 <= count <= 31e9
    assert count == analytic_parameter_count(config)
    with torch.device("meta"):
        meta_model = MovieGenTransformer(config)
    assert count == sum(p.numel() for p in meta_model.parameters())
    # Position tables cover 768 px x 256 frames: 73,728 tokens.
    assert num_video_tokens(config, config.max_latent_sizes) == 73_728
    assert num_video_tokens(config, (256 // 8, 768 // 8, 768 // 8)) == 73_728


@pytest.mark.parametrize("name", TRANSFORMER_RECIPES)
def test_every_recipe_builds_and_counts(name):
    config = transformer_recipe(name)
    assert count_parameters(config) == analytic_parameter_count(config)
    assert config.dim // config.num_heads == config.head_dim


def test_recipe_sizes_increase_and_match_their_names():
    counts = {name: count_parameters(name) for name in TRANSFORMER_RECIPES}
    assert list(counts.values()) == sorted(counts.values())
    for name in ("1B", "5B", "9B", "17B", "30B"):
        nominal = float(name[:-1]) * 1e9
        assert 0.85 * nominal <= counts[name] <= 1.15 * nominal, (name, counts[name])


def test_qk_norm_makes_attention_invariant_to_query_scale():
    x, t, context, mask = inputs(1, 2, 4, 4)
    for qk_norm in (True, False):
        model = perturbed_model(debug_config(qk_norm=qk_norm))
        assert (model.blocks[0].self_attn.q_norm is not None) == qk_norm
        with torch.no_grad():
            before = model(x, t, context, mask)
            for block in model.blocks:
                block.self_attn.wq.weight.mul_(7.0)
                block.cross_attn.wq.weight.mul_(7.0)
            after = model(x, t, context, mask)
        assert torch.isfinite(after).all()
        if qk_norm:
            torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
        else:
            assert not torch.allclose(after, before, atol=1e-3)


def test_timestep_changes_the_output(model):
    x, _, context, mask = inputs(2, 2, 4, 4)
    with torch.no_grad():
        early = model(x, torch.full((2,), 0.1), context, mask)
        late = model(x, torch.full((2,), 0.9), context, mask)
        scalar = model(x, torch.tensor(0.9), context, mask)
    assert (early - late).abs().mean() > 1e-3
    torch.testing.assert_close(scalar, late)


def test_untrained_model_predicts_zero_and_blocks_are_identity():
    torch.manual_seed(0)
    model = MovieGenTransformer(debug_config())
    x, t, context, mask = inputs(2, 2, 4, 4)
    with torch.no_grad():
        assert torch.equal(model(x, t, context, mask), torch.zeros_like(x))
        tokens = torch.randn(2, 8, 32)
        modulation = torch.zeros(2, 6, 32)
        keep = torch.ones(2, 1, 1)
        out = model.blocks[0](tokens, modulation, context, None, mask[:, None, None], keep)
    torch.testing.assert_close(out, tokens)


def test_meta_build_then_to_empty_and_init_weights():
    config = debug_config(qk_norm=True)
    with torch.device("meta"):
        model = MovieGenTransformer(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))  # to_empty leaves garbage; init must cover all
    torch.manual_seed(0)
    model.init_weights()
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name
    assert torch.equal(model.blocks[0].self_attn.q_norm.weight, torch.ones(config.head_dim))
    assert torch.equal(model.blocks[1].cross_norm.weight, torch.ones(config.dim))
    assert model.blocks[0].self_attn.wq.weight.std() > 0.01
    assert model.position_embed.rows.std() > 0.01
    x, t, context, mask = inputs(1, 2, 4, 4)
    with torch.no_grad():
        assert torch.equal(model(x, t, context, mask), torch.zeros_like(x))


def test_velocity_takes_conditioning_as_a_dict(model):
    x, t, context, mask = inputs(2, 2, 4, 4)
    video_mask = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        expected = model(x, t, context, mask, video_mask)
        got = model.velocity(
            x, t, {"context": context, "context_mask": mask, "video_mask": video_mask}
        )
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="missing \\['context_mask'\\]"):
        model.velocity(x, t, {"context": context})
    with pytest.raises(ValueError, match="unknown \\['fps'\\]"):
        model.velocity(x, t, {"context": context, "context_mask": mask, "fps": 16})


# ----------------------------------------------------------------------------- bad input


def _bad(name: str):
    x, t, context, mask = inputs(2, 2, 4, 4)
    args = {"x": x, "t": t, "context": context, "context_mask": mask, "video_mask": None}
    if name == "rank":
        args["x"] = x[:, :, 0]
    elif name == "channels":
        args["x"] = x[:, :8]
    elif name == "height-not-multiple-of-patch":
        args["x"] = x[..., :3, :]
    elif name == "width-not-multiple-of-patch":
        args["x"] = x[..., :3]
    elif name == "too-many-frames":
        args["x"] = torch.randn(2, CHANNELS, 9, 4, 4)
    elif name == "too-wide":
        args["x"] = torch.randn(2, CHANNELS, 1, 4, 18)
    elif name == "t-shape":
        args["t"] = t[:1]
    elif name == "context-width":
        args["context"] = torch.randn(2, TEXT_TOKENS, 48)
    elif name == "context-batch":
        args["context"] = context[:1]
    elif name == "context-mask-shape":
        args["context_mask"] = mask[:, :3]
    elif name == "video-mask-shape":
        args["video_mask"] = torch.ones(2, 2, 4, 2, dtype=torch.bool)
    elif name == "video-mask-transposed":
        args["video_mask"] = torch.ones(2, 4, 4, 2, dtype=torch.bool)
    return args


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("rank", "must be a latent"),
        ("channels", "expects 16"),
        ("height-not-multiple-of-patch", "height 3 is not a multiple"),
        ("width-not-multiple-of-patch", "width 3 is not a multiple"),
        ("too-many-frames", "max_latent_frames=8"),
        ("too-wide", "max_latent_width=16"),
        ("t-shape", "t must have shape"),
        ("context-width", "already projected"),
        ("context-batch", "context must be"),
        ("context-mask-shape", "context_mask must be"),
        ("video-mask-shape", "video_mask must be"),
        ("video-mask-transposed", "video_mask must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, case, message):
    with pytest.raises(ValueError, match=message):
        model(**_bad(case))


def test_non_bool_masks_are_type_errors(model):
    x, t, context, mask = inputs(1, 1, 2, 2)
    with pytest.raises(TypeError, match="context_mask must be bool"):
        model(x, t, context, mask.float())
    with pytest.raises(TypeError, match="video_mask must be bool"):
        model(x, t, context, mask, torch.ones(1, 1, 2, 2))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_heads": 3}, "divisible by num_heads"),
        ({"dim": 0}, "dim must be a positive integer"),
        ({"patch_size": (1, 2)}, "three positive integers"),
        ({"max_latent_height": 15}, "max_latent_height .* multiple"),
        ({"timestep_embed_dim": 255}, "even"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_bad_configs_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        debug_config(**changes)


def test_unknown_recipe_lists_the_choices():
    with pytest.raises(ValueError, match="debug, tiny, 1B, 5B, 9B, 17B, 30B"):
        transformer_recipe("40B")


# ----------------------------------------------------------------------------- FLOPs and summary


def test_forward_flops_hand_count_for_debug():
    config = transformer_recipe("debug")  # d 32, ffn 64, 2 layers, patch 1x2x2, 16 channels
    n, m = 8, 5  # video and text tokens
    self_attention = 2 * n * 32 * 128 + 4 * n * n * 32  # q, k, v, o + scores and values
    cross_attention = 2 * n * 32 * 64 + 2 * m * 32 * 64 + 4 * n * m * 32
    feed_forward = 2 * n * 32 * 3 * 64
    embed_and_head = 2 * (2 * n * 64 * 32)
    timestep = 2 * (256 * 32 + 32 * 32 + 32 * 192)
    expected = 2 * (self_attention + cross_attention + feed_forward) + embed_and_head + timestep
    assert expected == 557_056
    assert forward_flops(config, n, m) == expected
    assert train_step_flops(config, n, m) == 3 * expected


@pytest.mark.parametrize("pooled_text", [False, True])
def test_forward_flops_match_pytorch_flop_counter(pooled_text):
    model = perturbed_model(debug_config(pooled_text=pooled_text))
    config = model.config
    x, t, context, mask = inputs(1, 2, 4, 8, text=7)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x, t, context, mask)
    assert counter.get_total_flops() == forward_flops(
        config, num_video_tokens(config, (2, 4, 8)), 7
    )


def test_forward_flops_scale_with_layers_and_tokens():
    config = transformer_recipe("1B")
    base = forward_flops(dataclasses.replace(config, num_layers=1), 4096, 256)
    per_layer = layer_flops(config, 4096, 256)
    for layers in (2, 16, 48):
        scaled = forward_flops(dataclasses.replace(config, num_layers=layers), 4096, 256)
        assert scaled == pytest.approx(base + (layers - 1) * per_layer, rel=1e-12)
    # Linear parts double with the tokens, attention scores quadruple.
    ratio = forward_flops(config, 8192, 256) / forward_flops(config, 4096, 256)
    assert 2.0 < ratio < 2.5
    long_ratio = forward_flops(config, 2**20, 256) / forward_flops(config, 2**19, 256)
    assert long_ratio > 3.5


def test_describe_reports_size_and_tokens():
    text = describe("30B")
    assert "30B" in text and "6144" in text and "16384" in text
    assert f"{count_parameters('30B'):,}" in text
    assert "73,728" in text
    small = describe(transformer_recipe("tiny"), name="tiny", latent_shape=(2, 8, 8))
    assert "tiny" in small and "\nvideo tokens" in small and " 32\n" in small


# ----------------------------------------------------------------------------- learning


def test_debug_transformer_overfits_a_tiny_batch():
    # One latent shared by four samples that differ only in text (A/B) and
    # time (0.2/0.8), each with its own random target: a model that ignored
    # either input could not get below about half the initial loss, so a 10x
    # drop needs patchify, attention, cross-attention and adaLN all to learn.
    torch.manual_seed(0)
    model = MovieGenTransformer(transformer_recipe("debug"))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, CHANNELS, 2, 4, 4, generator=generator).expand(4, -1, -1, -1, -1)
    t = torch.tensor([0.2, 0.2, 0.8, 0.8])
    texts = torch.randn(2, TEXT_TOKENS, 32, generator=generator)
    context = texts[[0, 1, 0, 1]]
    mask = torch.ones(4, TEXT_TOKENS, dtype=torch.bool)
    target = torch.randn(x.shape, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(model(x, t, context, mask), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
