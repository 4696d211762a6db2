"""Text conditioning: frozen encoders behind one interface, projection, prompt handling.

prompts -> :class:`TextConditioner` (frozen: UL2 / ByT5 on quoted text /
MetaCLIP, or MiniLM on CPU) -> ``{name: (hidden, mask)}`` -> (precompute,
caption dropout with :func:`drop_features`) -> :class:`TextProjector`
(trainable) -> cross-attention context ``(B, L_total, dim)`` and mask.
"""

from moviegen.text.conditioner import (
    CAPTION_DROPOUT,
    TextConditioner,
    caption_keep_mask,
    drop_captions,
    drop_features,
    pad_features,
)
from moviegen.text.encoders import (
    ByT5Encoder,
    CLIPTextEncoder,
    FrozenTextEncoder,
    MiniLMEncoder,
    T5Encoder,
    TextEncoderConfig,
    TinyTextEncoder,
    build_text_encoder,
    default_text_encoders,
    paper_text_encoders,
)
from moviegen.text.projector import TextFeatures, TextProjector
from moviegen.text.prompts import (
    NULL_PROMPT,
    add_fps_prefix,
    extract_quoted_spans,
    validate_prompt,
)

__all__ = [
    "CAPTION_DROPOUT",
    "NULL_PROMPT",
    "ByT5Encoder",
    "CLIPTextEncoder",
    "FrozenTextEncoder",
    "MiniLMEncoder",
    "T5Encoder",
    "TextConditioner",
    "TextEncoderConfig",
    "TextFeatures",
    "TextProjector",
    "TinyTextEncoder",
    "add_fps_prefix",
    "build_text_encoder",
    "caption_keep_mask",
    "default_text_encoders",
    "drop_captions",
    "drop_features",
    "extract_quoted_spans",
    "pad_features",
    "paper_text_encoders",
    "validate_prompt",
]
