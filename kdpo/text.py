"""Plain-text helpers shared by the editors and the driver."""
from __future__ import annotations

import re

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """``text`` split after each ``.``, ``!`` or ``?`` that whitespace follows."""
    return [part for part in SENTENCE_END.split(text.strip()) if part]
