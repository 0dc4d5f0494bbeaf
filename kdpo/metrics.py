"""Knowledge-editing metrics as pure functions, computed as EasyEdit computes them.

- edit success / generalization / portability: teacher-forced token accuracy of the answer;
- locality: share of teacher-forced argmax tokens on locality prompts unchanged from the pre-edit model;
- the ``_exact`` variants: greedy generation of the answer's length, 1.0 only for the exact token ids;
- fluency: weighted 2/3-gram entropy of a greedy generation (weights 2/3 and 4/3, log base 2).
"""
from __future__ import annotations

import math
import re
from collections import Counter

import torch

from kdpo.modeling import IGNORE

_WORD = re.compile(r"\w+|[^\w\s]")


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example: share of answer positions whose argmax is the answer token. [B, L, V], [B, L] -> [B]."""
    mask = labels != IGNORE
    correct = (logits.argmax(-1) == labels) & mask
    return correct.sum(-1) / mask.sum(-1).clamp_min(1)


def answer_predictions(logits: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Per example: the argmax tokens at the answer positions (the locality fingerprint)."""
    predictions = logits.argmax(-1)
    return [row[mask].tolist() for row, mask in zip(predictions, labels != IGNORE)]


def agreement(before: list[int], after: list[int]) -> float:
    """Share of positions where two prediction lists agree (EasyEdit's locality for one prompt)."""
    if len(before) != len(after):
        raise ValueError("locality predictions must cover the same answer positions")
    return sum(a == b for a, b in zip(before, after)) / max(len(before), 1)


def exact_match(generated: list[int], expected: list[int]) -> float:
    """1.0 if the generated token ids are exactly the expected ones, else 0.0."""
    return float(generated == expected)


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """EasyEdit's ``compute_n_gram_entropy``: mean over n of weight_n x entropy (bits) of the n-grams."""
    words = _WORD.findall(text)
    terms = []
    for n, weight in zip(ns, weights):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(weight * entropy)
    return sum(terms) / len(terms)


def mean(values) -> float | None:
    """Mean of the values that are not None; None if there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
