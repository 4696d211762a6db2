"""Prompt handling: validation, the quoted-span rule for visual text, FPS prefix.

Movie Gen (MOVIEGEN.md section 3) feeds ByT5 only the "visual text" of a
prompt: the characters that should appear on screen. We take those to be the
quoted spans, see :func:`extract_quoted_spans`. The sampling frame rate is
prepended to every caption (``FPS-16 a dog runs``) by :func:`add_fps_prefix`,
which lives with the other caption helpers in :mod:`moviegen.data.transforms`
and is re-exported here.
"""

from __future__ import annotations

import re

from moviegen.data.transforms import add_fps_prefix, strip_fps_prefix

__all__ = ["NULL_PROMPT", "add_fps_prefix", "extract_quoted_spans", "validate_prompt"]

# The unconditional prompt for classifier-free guidance and caption dropout.
NULL_PROMPT = ""

# A span opens with a straight double quote and closes at the next straight
# double quote, or opens with a left curly quote and closes at the next right
# curly quote. Single quotes are not used: apostrophes ("the dog's ball") would
# open spurious spans.
_QUOTED_SPAN = re.compile(r'"([^"]*)"|“([^”]*)”')
# Separator between quoted spans when several are joined.
_SPAN_SEPARATOR = " "


def extract_quoted_spans(prompt: str) -> str:
    """The visual text of a prompt: its quoted spans, joined with one space.

    Rule: scanning left to right, a span is the text between a straight double
    quote ``"`` and the next ``"``, or between a left curly quote ``“`` and the
    next right curly quote ``”``. Spans do not nest; an opening quote without a
    matching closing quote starts no span; single quotes never count. Each span
    is stripped of surrounding whitespace and empty spans are dropped. The
    result is the empty string when the prompt has no (non-empty) span.

    >>> extract_quoted_spans('a neon sign that says "OPEN" next to “Bar 24”')
    'OPEN Bar 24'
    >>> extract_quoted_spans("a dog's ball")
    ''
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    spans = (straight or curly for straight, curly in _QUOTED_SPAN.findall(prompt))
    return _SPAN_SEPARATOR.join(span.strip() for span in spans if span.strip())


def validate_prompt(prompt: str, *, allow_empty: bool = False) -> str:
    """Return ``prompt`` stripped of surrounding whitespace.

    A prompt that is empty, whitespace-only, or nothing but an FPS prefix
    (``"FPS-16 "``) is a ``ValueError`` unless ``allow_empty``: a user's prompt
    or a training caption with no text is a mistake, while the unconditional
    prompt of classifier-free guidance (:data:`NULL_PROMPT`) is empty on purpose.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    stripped = prompt.strip()
    # strip_fps_prefix expects the space that follows the prefix.
    content = strip_fps_prefix(stripped + " ").strip()
    if not content and not allow_empty:
        raise ValueError(
            f"empty prompt {prompt!r}: every caption needs some text; for the "
            "unconditional (CFG) prompt pass allow_empty=True or use TextConditioner.encode_null()"
        )
    return stripped
