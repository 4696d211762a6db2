"""The set of frozen encoders a model is conditioned on, and caption dropout.

:class:`TextConditioner` turns prompts into raw frozen features, one entry per
encoder (what a precompute step writes to disk). The trainable
:class:`~moviegen.text.projector.TextProjector` turns those into the
cross-attention context.

Classifier-free guidance needs the model to see the unconditional prompt during
training (MOVIEGEN.md section 3: rate not given, 10% is usual). Trainers that
precompute features drop *features*: :func:`drop_features` swaps the features
of dropped samples for those of the empty prompt (:meth:`TextConditioner.encode_null`),
with the dropped samples drawn by :func:`caption_keep_mask`. :func:`drop_captions`
is the same at the level of strings, for on-the-fly encoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moviegen.text.encoders import FrozenTextEncoder, TextEncoderConfig, build_text_encoder
from moviegen.text.projector import TextFeatures, check_features
from moviegen.text.prompts import NULL_PROMPT, validate_prompt

__all__ = [
    "CAPTION_DROPOUT",
    "TextConditioner",
    "caption_keep_mask",
    "drop_captions",
    "drop_features",
    "pad_features",
]

# Probability that a training caption is replaced by the empty prompt.
CAPTION_DROPOUT = 0.1


class TextConditioner:
    """Frozen encoders built from configs: ``encode(prompts) -> {name: (hidden, mask)}``.

    Deliberately not an ``nn.Module``: the frozen weights must stay out of the
    trained model's state dict, optimizer and sharding. Move it with :meth:`to`.
    Each encoder applies its own quoted-only rule (``TextEncoderConfig.quoted_only``).
    """

    def __init__(self, configs: Sequence[TextEncoderConfig]):
        configs = list(configs)
        if not configs:
            raise ValueError("TextConditioner needs at least one TextEncoderConfig")
        names = [config.name for config in configs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"text encoder names must be unique; repeated: {duplicates}")
        self.encoders: dict[str, FrozenTextEncoder] = {
            config.name: build_text_encoder(config) for config in configs
        }

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.encoders)

    @property
    def dims(self) -> dict[str, int]:
        """Feature width per encoder: the ``encoder_dims`` of a ``TextProjector``."""
        return {name: encoder.dim for name, encoder in self.encoders.items()}

    def to(self, device: torch.device | str) -> TextConditioner:
        for encoder in self.encoders.values():
            encoder.to(device)
        return self

    def encode(
        self, prompts: Sequence[str], *, allow_empty: bool = True
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Encode B prompts with every encoder.

        Prompts are stripped by ``validate_prompt``. The empty prompt is the
        unconditional prompt (CFG's negative prompt, dropped captions) and is
        encoded like any other; pass ``allow_empty=False`` where an empty
        prompt is a bug, e.g. when encoding a data set's captions.

        Returns:
            ``name -> (hidden float32 (B, L_name, D_name), mask bool (B, L_name))``.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt]")
        cleaned = [validate_prompt(prompt, allow_empty=allow_empty) for prompt in prompts]
        return {name: encoder.encode(cleaned) for name, encoder in self.encoders.items()}

    def encode_null(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Features of the unconditional (empty) prompt, batch size 1."""
        return self.encode([NULL_PROMPT])


# ----------------------------------------------------------------------------- dropout


def caption_keep_mask(
    batch_size: int, rate: float = CAPTION_DROPOUT, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw which captions survive dropout: bool ``(B,)``, False with probability ``rate``.

    The draw lives on ``generator``'s device (CPU when None, which uses the
    global generator); a seeded generator makes it reproducible.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"caption dropout rate must be in [0, 1], got {rate}")
    device = generator.device if generator is not None else None
    return torch.rand(batch_size, generator=generator, device=device) >= rate


def drop_captions(
    prompts: Sequence[str], rate: float = CAPTION_DROPOUT, generator: torch.Generator | None = None
) -> tuple[list[str], torch.Tensor]:
    """Replace each prompt by the empty prompt with probability ``rate``.

    Returns:
        The new prompts and ``keep``, bool ``(B,)``, False where a prompt was dropped.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt]")
    prompts = list(prompts)
    keep = caption_keep_mask(len(prompts), rate, generator)
    dropped = [
        prompt if kept else NULL_PROMPT for prompt, kept in zip(prompts, keep.tolist(), strict=True)
    ]
    return dropped, keep


def pad_features(
    hidden: torch.Tensor, mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(B, L, D)`` features and their ``(B, L)`` mask to ``length`` tokens.

    Padding is zero features and a False mask; ``length`` must be at least ``L``.
    """
    current = hidden.shape[1]
    if length < current:
        raise ValueError(f"cannot pad {current} tokens down to {length}")
    if length == current:
        return hidden, mask
    extra = length - current
    hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], extra, hidden.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return hidden, mask


def drop_features(
    features: TextFeatures, keep: torch.Tensor, null_features: TextFeatures
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Caption dropout on precomputed features.

    Args:
        features: ``name -> (hidden (B, L, D), mask bool (B, L))``.
        keep: bool ``(B,)``; rows where it is False get the null features.
        null_features: the same encoders' features of the empty prompt, batch 1
            (or B), e.g. from :meth:`TextConditioner.encode_null`.

    Returns:
        ``name -> (hidden (B, max(L, L_null), D), mask (B, max(L, L_null)))``.
        Both sides are padded to the longer length whether or not a row was
        dropped, so the shape does not depend on the random draw.
    """
    missing = sorted(set(features) - set(null_features))
    extra = sorted(set(null_features) - set(features))
    if missing or extra:
        raise ValueError(
            f"null features must cover the same encoders as the features: "
            f"missing {missing}, unexpected {extra}"
        )
    if keep.dtype != torch.bool or keep.ndim != 1:
        raise ValueError(f"keep must be a bool (B,) tensor, got {keep.dtype} {tuple(keep.shape)}")
    dropped = {}
    for name, (hidden, mask) in features.items():
        check_features(name, hidden, mask)
        null_hidden, null_mask = null_features[name]
        check_features(f"{name} (null)", null_hidden, null_mask)
        batch_size = hidden.shape[0]
        if batch_size != keep.shape[0]:
            raise ValueError(
                f"text features {name!r}: batch size {batch_size}, but keep has {keep.shape[0]}"
            )
        if null_hidden.shape[0] not in (1, batch_size):
            raise ValueError(
                f"null features {name!r}: batch size must be 1 or {batch_size}, "
                f"got {null_hidden.shape[0]}"
            )
        if null_hidden.shape[2] != hidden.shape[2]:
            raise ValueError(
                f"null features {name!r}: width {null_hidden.shape[2]} != {hidden.shape[2]}"
            )
        length = max(hidden.shape[1], null_hidden.shape[1])
        hidden, mask = pad_features(hidden, mask, length)
        null_hidden, null_mask = pad_features(
            null_hidden.to(hidden), null_mask.to(mask.device), length
        )
        rows = keep.to(hidden.device)
        dropped[name] = (
            torch.where(rows[:, None, None], hidden, null_hidden),  # (B, L, D)
            torch.where(rows[:, None], mask, null_mask),  # (B, L)
        )
    return dropped
