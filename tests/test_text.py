"""Text conditioning: offline backends, masks, quoted-only ByT5, projector, caption dropout."""

from __future__ import annotations

import json
import socket
import string
import warnings

import pytest
import torch
from transformers import (
    ByT5Tokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    T5Config,
    T5EncoderModel,
)

import moviegen.data.transforms as transforms
from moviegen.config import config_from_dict, config_to_dict
from moviegen.text import (
    CAPTION_DROPOUT,
    ByT5Encoder,
    CLIPTextEncoder,
    FrozenTextEncoder,
    MiniLMEncoder,
    T5Encoder,
    TextConditioner,
    TextEncoderConfig,
    TextProjector,
    TinyTextEncoder,
    add_fps_prefix,
    build_text_encoder,
    caption_keep_mask,
    default_text_encoders,
    drop_captions,
    drop_features,
    extract_quoted_spans,
    paper_text_encoders,
    validate_prompt,
)

# Width of the tiny checkpoints written by the fixtures.
TINY_DIM = 32
# Position table of the tiny CLIP checkpoint.
CLIP_POSITIONS = 64
# Features of one prompt, encoded alone or batched, agree to float rounding.
ATOL = 1e-5

SHORT = "a red fox"
LONG = "a red fox jumps over a sleepy brown dog"


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Any attempt to open a connection fails: every model loads offline.

    Module-scoped and autouse, so it is in place before the encoders are built.
    """

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny random T5 (with a saved tokenizer), ByT5 and CLIP checkpoint directories."""
    root = tmp_path_factory.mktemp("text_checkpoints")
    byte_vocab = len(ByT5Tokenizer())
    torch.manual_seed(0)
    # Dropout stays at its default (0.1): a test in train mode would not be deterministic.
    t5_config = T5Config(
        vocab_size=byte_vocab, d_model=TINY_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    T5EncoderModel(t5_config).save_pretrained(root / "t5")
    ByT5Tokenizer().save_pretrained(root / "t5")
    T5EncoderModel(t5_config).save_pretrained(root / "byt5")

    clip_dir = root / "clip"
    clip_dir.mkdir()
    # Byte-level BPE without merges: letters, word-final letters, BOS, EOS (= pad).
    letters = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    vocab = {token: index for index, token in enumerate(tokens)}
    (clip_dir / "vocab.json").write_text(json.dumps(vocab))
    (clip_dir / "merges.txt").write_text("#version: 0.2\n")
    clip_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TINY_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_POSITIONS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(clip_config).save_pretrained(clip_dir)
    return {kind: str(root / kind) for kind in ("t5", "byt5", "clip")}


def make_config(kind: str, checkpoints: dict[str, str], **overrides) -> TextEncoderConfig:
    fields = {"name": f"my_{kind}", "kind": kind, "max_length": CLIP_POSITIONS}
    if kind in checkpoints:
        fields["path"] = checkpoints[kind]
    if kind == "byt5":
        fields["quoted_only"] = True
    fields.update(overrides)
    return TextEncoderConfig(**fields)


@pytest.fixture(scope="module")
def encoders(checkpoints) -> dict[str, FrozenTextEncoder]:
    built = {kind: build_text_encoder(make_config(kind, checkpoints)) for kind in checkpoints}
    built["tiny"] = build_text_encoder(make_config("tiny", checkpoints, dim=TINY_DIM))
    return built


@pytest.fixture(scope="module")
def minilm() -> FrozenTextEncoder:
    (config,) = default_text_encoders()
    return build_text_encoder(config)


def both_encoders(encoders, minilm) -> dict[str, FrozenTextEncoder]:
    return {**encoders, "minilm": minilm}


def quote_if_needed(encoder: FrozenTextEncoder, text: str) -> str:
    return f'a sign that says "{text}"' if encoder.quoted_only else text


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ('a neon sign that says "OPEN"', "OPEN"),
        ("a poster reading “Bar 24” in red", "Bar 24"),
        ('"Hello" and then “World” and "!"', "Hello World !"),
        ('a mug with "  coffee  " on it', "coffee"),
        ("a dog's ball and the cat's toy", ""),
        ('an unclosed "quote here', ""),
        ('empty "" quotes', ""),
        ("no quotes at all", ""),
        ('mixed “curly" is not closed by a straight quote', ""),
    ],
)
def test_extract_quoted_spans(prompt, expected):
    assert extract_quoted_spans(prompt) == expected


def test_validate_prompt_strips_and_rejects_empty():
    assert validate_prompt("  a cat \n") == "a cat"
    for empty in ["", "   ", "\n\t", "FPS-16 ", add_fps_prefix("", 24)]:
        with pytest.raises(ValueError, match="empty prompt"):
            validate_prompt(empty)
    assert validate_prompt("  ", allow_empty=True) == ""
    with pytest.raises(TypeError):
        validate_prompt(None)


def test_add_fps_prefix_is_the_data_helper():
    assert add_fps_prefix is transforms.add_fps_prefix
    assert add_fps_prefix("a dog runs", 16) == "FPS-16 a dog runs"


# ----------------------------------------------------------------------------- configs


def test_config_validation():
    with pytest.raises(ValueError, match="needs `path`"):
        TextEncoderConfig(name="ul2", kind="t5", max_length=8)
    with pytest.raises(ValueError, match="unknown kind"):
        TextEncoderConfig(name="x", kind="gpt", max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        TextEncoderConfig(name="x", kind="tiny", max_length=0)
    with pytest.raises(ValueError, match="name"):
        TextEncoderConfig(name="a.b", kind="tiny", max_length=8)
    with pytest.raises(ValueError, match="multiple of"):
        TextEncoderConfig(name="x", kind="tiny", max_length=8, dim=12)
    with pytest.raises(ValueError, match="randomly initialised"):
        TextEncoderConfig(name="x", kind="tiny", max_length=8, path="/tmp")


def test_config_round_trips_through_json_dicts():
    for config in [*paper_text_encoders("/u", "/b", "/m"), *default_text_encoders()]:
        assert config_from_dict(TextEncoderConfig, config_to_dict(config)) == config
    with pytest.raises(ValueError, match="kind"):
        config_from_dict(TextEncoderConfig, {"name": "x", "kind": "gpt", "max_length": 8})


def test_recipes():
    (minilm,) = default_text_encoders()
    assert (minilm.name, minilm.kind, minilm.path, minilm.quoted_only) == (
        "minilm",
        "minilm",
        None,
        False,
    )
    configs = {config.name: config for config in paper_text_encoders("/u", "/b", "/m")}
    assert {name: (c.kind, c.path, c.max_length, c.quoted_only) for name, c in configs.items()} == {
        "ul2": ("t5", "/u", 512, False),
        "byt5": ("byt5", "/b", 256, True),
        "metaclip": ("clip", "/m", 256, False),
    }


# ----------------------------------------------------------------------------- backends


def test_backends_load_offline_with_checkpoint_widths(encoders, minilm):
    expected = {
        "t5": T5Encoder,
        "byt5": ByT5Encoder,
        "clip": CLIPTextEncoder,
        "tiny": TinyTextEncoder,
        "minilm": MiniLMEncoder,
    }
    for kind, encoder in both_encoders(encoders, minilm).items():
        assert type(encoder) is expected[kind]
        hidden, mask = encoder.encode([quote_if_needed(encoder, SHORT)] * 2)
        assert hidden.dtype == torch.float32 and mask.dtype == torch.bool, kind
        assert hidden.shape == (*mask.shape, encoder.dim), kind
        assert mask.all(), kind
    assert {kind: encoders[kind].dim for kind in encoders} == dict.fromkeys(encoders, TINY_DIM)
    assert minilm.dim == 384


def test_encoders_are_frozen(encoders, minilm):
    for kind, encoder in both_encoders(encoders, minilm).items():
        encoder.train()  # a parent module switching to training must not re-enable dropout
        assert not encoder.training, kind
        assert not any(module.training for module in encoder.modules()), kind
        assert not any(param.requires_grad for param in encoder.parameters()), kind
        hidden, _ = encoder.encode([quote_if_needed(encoder, SHORT)])
        assert not hidden.requires_grad, kind


def test_masks_and_batching_invariance(encoders, minilm):
    for kind, encoder in both_encoders(encoders, minilm).items():
        short, long = quote_if_needed(encoder, SHORT), quote_if_needed(encoder, LONG)
        alone, alone_mask = encoder.encode([short])
        batched, batched_mask = encoder.encode([short, long])
        num_real = int(alone_mask.sum())
        assert alone_mask.all() and num_real == alone.shape[1], kind
        assert batched_mask[1].all() and batched.shape[1] > num_real, kind
        # Padding is masked out and zeroed; real positions are untouched by batching.
        assert batched_mask[0, :num_real].all() and not batched_mask[0, num_real:].any(), kind
        assert torch.all(batched[0, num_real:] == 0), kind
        torch.testing.assert_close(batched[0, :num_real], alone[0], atol=ATOL, rtol=0)


def test_minilm_is_pretrained_and_separates_captions(minilm):
    captions = [
        "a dog runs on the beach",
        "a puppy running along the sand by the sea",
        "a stock market chart with falling prices",
    ]
    hidden, mask = minilm.encode(captions)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (3, 384)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    similar, unrelated = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
    # Random weights would not rank paraphrases above unrelated text by a margin.
    assert similar > unrelated + 0.2, (similar, unrelated)
    again, _ = minilm.encode(captions[:1])
    torch.testing.assert_close(again[0], hidden[0, : again.shape[1]], atol=ATOL, rtol=0)


def test_byt5_sees_only_quoted_text(encoders):
    encoder = encoders["byt5"]
    seen = []
    tokenizer = encoder.tokenizer

    class Spy:
        def __call__(self, texts, **kwargs):
            seen.extend(texts)
            return tokenizer(texts, **kwargs)

    encoder.tokenizer = Spy()
    try:
        encoder.encode(['FPS-16 a sign that says "hi" next to “Bar 24”'])
    finally:
        encoder.tokenizer = tokenizer
    assert seen and set(seen) == {"hi Bar 24"}

    reference, _ = encoder.encode(['"hi"'])
    for prompt in ['a sign that says "hi"', "the word “hi” in neon"]:
        hidden, mask = encoder.encode([prompt])
        assert mask.all()
        torch.testing.assert_close(hidden, reference, atol=ATOL, rtol=0)
    other, _ = encoder.encode(['"ho"'])
    assert not torch.allclose(other, reference, atol=1e-3)


def test_quoted_only_prompt_without_quotes_has_no_tokens(encoders):
    encoder = encoders["byt5"]
    hidden, mask = encoder.encode(["hi", "no quotes here"])
    assert mask.shape == (2, 1) and not mask.any()
    assert hidden.shape == (2, 1, encoder.dim) and torch.all(hidden == 0)

    hidden, mask = encoder.encode(["no quotes", 'says "ok"'])
    alone, alone_mask = encoder.encode(['"ok"'])
    assert not mask[0].any() and torch.all(hidden[0] == 0)
    assert torch.equal(mask[1], alone_mask[0])
    torch.testing.assert_close(hidden[1], alone[0], atol=ATOL, rtol=0)


def test_truncation_warns_with_encoder_and_lengths(checkpoints):
    max_length = 8
    for kind in ("t5", "clip", "tiny"):
        encoder = build_text_encoder(make_config(kind, checkpoints, max_length=max_length))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            encoder.encode(["abc"])
        with pytest.warns(UserWarning, match=rf"'my_{kind}'.*max_length={max_length}") as record:
            hidden, mask = encoder.encode(["abc", LONG])
        full_length = len(encoder.tokenizer([LONG])["input_ids"][0])
        assert f"lengths [{full_length}]" in str(record[0].message), kind
        assert hidden.shape[1] == max_length and mask[1].all(), kind


def test_missing_or_incomplete_path_names_encoder_path_and_files(tmp_path, checkpoints):
    missing = tmp_path / "nowhere"
    config = TextEncoderConfig(name="ul2", kind="t5", path=str(missing), max_length=8)
    with pytest.raises(ValueError, match="ul2") as error:
        build_text_encoder(config)
    assert str(missing) in str(error.value) and "config.json" in str(error.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    config = TextEncoderConfig(name="metaclip", kind="clip", path=str(empty), max_length=8)
    with pytest.raises(ValueError, match="metaclip") as error:
        build_text_encoder(config)
    message = str(error.value)
    assert str(empty) in message
    assert all(name in message for name in ("config.json", "model.safetensors", "vocab.json"))

    # A CLIP checkpoint cannot serve as ByT5: the error says what went wrong.
    config = TextEncoderConfig(name="byt5", kind="byt5", path=checkpoints["clip"], max_length=8)
    with pytest.raises(ValueError, match="byt5"):
        build_text_encoder(config)


def test_clip_max_length_beyond_positions_is_an_error(checkpoints):
    with pytest.raises(ValueError, match="positions"):
        build_text_encoder(make_config("clip", checkpoints, max_length=CLIP_POSITIONS + 1))


def test_tiny_encoder_is_deterministic_given_seed():
    def features(seed: int) -> torch.Tensor:
        config = TextEncoderConfig(name="t", kind="tiny", max_length=16, dim=16, seed=seed)
        return build_text_encoder(config).encode([SHORT])[0]

    state = torch.get_rng_state()
    first = features(3)
    assert torch.equal(torch.get_rng_state(), state), "building must not consume global RNG"
    assert torch.equal(first, features(3))
    assert not torch.allclose(first, features(4))


# ----------------------------------------------------------------------------- projector


def random_features(batch: int, length: int, width: int, seed: int, num_real: list[int]):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=generator)
    mask = torch.arange(length)[None, :] < torch.tensor(num_real)[:, None]
    return hidden, mask


def test_projector_concatenates_in_sorted_order_with_masks():
    torch.manual_seed(0)
    projector = TextProjector({"zeta": 3, "alpha": 5}, dim=8)
    zeta = random_features(2, 4, 3, seed=1, num_real=[4, 2])
    alpha = random_features(2, 2, 5, seed=2, num_real=[1, 2])
    context, mask = projector({"zeta": zeta, "alpha": alpha})
    assert projector.names == ("alpha", "zeta")
    assert context.shape == (2, 6, 8) and mask.shape == (2, 6)
    assert torch.equal(mask, torch.cat([alpha[1], zeta[1]], dim=1))
    expected_alpha = projector.projections["alpha"](alpha[0])
    expected_zeta = projector.projections["zeta"](zeta[0])
    torch.testing.assert_close(context[0, 0], expected_alpha[0, 0])
    torch.testing.assert_close(context[:, 2:][mask[:, 2:]], expected_zeta[zeta[1]])
    assert torch.all(context[~mask] == 0)
    # Each segment went through its own LayerNorm: unit variance at real tokens.
    torch.testing.assert_close(
        context[mask].var(-1, unbiased=False), torch.ones(int(mask.sum())), atol=1e-3, rtol=0
    )


def test_projector_is_trainable_and_rejects_mismatches():
    projector = TextProjector({"a": 4, "b": 6}, dim=8)
    a, b = random_features(2, 3, 4, 0, [3, 1]), random_features(2, 2, 6, 1, [2, 2])
    context, mask = projector({"a": a, "b": b})
    context[mask].square().mean().backward()
    assert all(param.grad is not None for param in projector.parameters())

    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        projector({"a": a})
    with pytest.raises(ValueError, match=r"unexpected \['c'\]"):
        projector({"a": a, "b": b, "c": b})
    with pytest.raises(ValueError, match="width 4"):
        projector({"a": a, "b": a})
    with pytest.raises(ValueError, match="batch size"):
        projector({"a": a, "b": (b[0][:1], b[1][:1])})
    with pytest.raises(ValueError, match="mask shape"):
        projector({"a": a, "b": (b[0], b[1][:, :1])})
    with pytest.raises(ValueError, match="bool"):
        projector({"a": a, "b": (b[0], b[1].float())})
    with pytest.raises(ValueError, match="at least one"):
        TextProjector({}, dim=8)


# ----------------------------------------------------------------------------- conditioner


@pytest.fixture(scope="module")
def conditioner() -> TextConditioner:
    return TextConditioner(
        [
            TextEncoderConfig(name="words", kind="tiny", max_length=64, dim=16, seed=0),
            TextEncoderConfig(
                name="glyphs", kind="tiny", max_length=64, dim=24, seed=1, quoted_only=True
            ),
        ]
    )


def test_conditioner_encodes_per_encoder_and_feeds_projector(conditioner):
    assert conditioner.dims == {"words": 16, "glyphs": 24}
    prompts = [add_fps_prefix('a sign that says "hi"', 16), "a cat sleeps"]
    features = conditioner.encode(prompts)
    assert set(features) == {"words", "glyphs"}
    words_hidden, words_mask = features["words"]
    assert words_hidden.shape[-1] == 16 and words_mask.all(dim=1).any()
    _, glyphs_mask = features["glyphs"]
    assert glyphs_mask[0].sum() == len("hi") + 1  # two bytes and </s>
    assert not glyphs_mask[1].any()

    projector = TextProjector(conditioner.dims, dim=8)
    context, mask = projector(features)
    assert context.shape == (2, glyphs_mask.shape[1] + words_mask.shape[1], 8)
    context[mask].sum().backward()
    assert projector.projections["words"].linear.weight.grad is not None


def test_conditioner_empty_prompts_and_duplicate_names(conditioner):
    with pytest.raises(ValueError, match="empty prompt"):
        conditioner.encode(["a dog", "   "], allow_empty=False)
    null = conditioner.encode_null()
    assert null["words"][1].shape[0] == 1 and null["words"][1].any()
    assert not null["glyphs"][1].any()
    # The unconditional prompt (CFG negative prompt) encodes like any other.
    for name, (hidden, mask) in conditioner.encode(["  "]).items():
        assert torch.equal(hidden, null[name][0]) and torch.equal(mask, null[name][1])
    config = TextEncoderConfig(name="same", kind="tiny", max_length=8, dim=8)
    with pytest.raises(ValueError, match="unique"):
        TextConditioner([config, config])


# ----------------------------------------------------------------------------- dropout


def test_caption_keep_mask_is_seeded_and_has_the_rate():
    def draw(seed: int, size: int = 64) -> torch.Tensor:
        return caption_keep_mask(size, CAPTION_DROPOUT, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    dropped = 1 - draw(0, size=20_000).float().mean()
    assert abs(dropped - CAPTION_DROPOUT) < 0.01
    assert caption_keep_mask(8, 0.0).all() and not caption_keep_mask(8, 1.0).any()
    with pytest.raises(ValueError, match="rate"):
        caption_keep_mask(8, 1.5)


def test_drop_captions_empties_exactly_the_dropped_prompts():
    prompts = [f"caption {index}" for index in range(32)]
    generator = torch.Generator().manual_seed(0)
    dropped, keep = drop_captions(prompts, 0.5, generator)
    assert 0 < keep.sum() < len(prompts)
    assert dropped == [prompt if kept else "" for prompt, kept in zip(prompts, keep, strict=True)]
    again, _ = drop_captions(prompts, 0.5, torch.Generator().manual_seed(0))
    assert again == dropped


def test_drop_features_swaps_exactly_the_dropped_rows(conditioner):
    prompts = ["a red fox", 'a sign "OPEN"', "a long caption about a small boat", "rain"]
    features = conditioner.encode(prompts)
    null = conditioner.encode_null()
    keep = torch.tensor([True, False, True, False])
    swapped = drop_features(features, keep, null)
    for name, (hidden, mask) in features.items():
        out_hidden, out_mask = swapped[name]
        null_hidden, null_mask = null[name]
        length = max(hidden.shape[1], null_hidden.shape[1])
        assert out_hidden.shape == (4, length, hidden.shape[2]) and out_mask.shape == (4, length)
        for row in (0, 2):
            assert torch.equal(out_hidden[row, : hidden.shape[1]], hidden[row])
            assert torch.equal(out_mask[row, : mask.shape[1]], mask[row])
            assert not out_mask[row, mask.shape[1] :].any()
        for row in (1, 3):
            assert torch.equal(out_hidden[row, : null_hidden.shape[1]], null_hidden[0])
            assert torch.equal(out_mask[row, : null_mask.shape[1]], null_mask[0])
            assert not out_mask[row, null_mask.shape[1] :].any()
            assert torch.all(out_hidden[row, null_hidden.shape[1] :] == 0)

    # Null features longer than the batch's: the batch is padded up to them.
    short = {name: (hidden[:, :1], mask[:, :1]) for name, (hidden, mask) in features.items()}
    longer_null = {
        "words": null["words"],
        "glyphs": (torch.ones(1, 5, 24), torch.ones(1, 5, dtype=torch.bool)),
    }
    padded = drop_features(short, torch.tensor([True, True, True, False]), longer_null)
    hidden, mask = padded["glyphs"]
    assert hidden.shape == (4, 5, 24) and mask.shape == (4, 5)
    assert torch.equal(hidden[:3, :1], short["glyphs"][0][:3])
    assert not mask[:3, 1:].any() and torch.all(hidden[:3, 1:] == 0)
    assert mask[3].all() and torch.all(hidden[3] == 1)

    with pytest.raises(ValueError, match="missing"):
        drop_features(features, keep, {"words": null["words"]})
    with pytest.raises(ValueError, match="keep"):
        drop_features(features, keep.long(), null)
    with pytest.raises(ValueError, match="batch size"):
        drop_features(features, keep[:3], null)
