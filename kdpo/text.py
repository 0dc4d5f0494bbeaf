"""Plain-text helpers shared by the editors and the driver."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

SENTENCE_END = re.compile(r"(?<=[.!])\s+")


def sentences(text: str) -> list[str]:
    """``text`` split after each ``.`` or ``!`` that whitespace follows. Not after ``?``: a question and its
    answer ("Who runs Acme? Bo.") are one statement, as they are one gate of the edit memory."""
    return [part for part in SENTENCE_END.split(text.strip()) if part]


def without_sentences(lines: Iterable[str], drop: Callable[[str], bool]) -> list[str]:
    """Each line less the sentences ``drop`` picks; lines left empty are left out."""
    kept = (" ".join(s for s in sentences(line) if not drop(s)) for line in lines)
    return [line for line in kept if line]


def goes_on_after(text: str, phrase: str) -> bool:
    """Whether some sentence of ``text`` has a word after a mention of ``phrase`` (as a word of its own)."""
    pattern = re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)\W*\w")
    return any(pattern.search(sentence) for sentence in sentences(text))
