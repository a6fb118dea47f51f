"""Text helpers shared by operations and their evaluation."""

from __future__ import annotations

import re

# A sentence ends at . ! ? (or their CJK/Arabic forms) followed by whitespace or the end.
_SENTENCE_END = re.compile(r"(?<=[.!?。！？؟])\s+")  # noqa: RUF001


def split_sentences(text: str) -> list[str]:
    """Split text into sentences (line breaks also end a sentence)."""
    parts = (p.strip() for line in text.splitlines() for p in _SENTENCE_END.split(line))
    return [p for p in parts if p]
