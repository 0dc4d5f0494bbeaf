"""Metrics on known cases."""
import math

import pytest
import torch

from kdpo.metrics import agreement, answer_predictions, mean, ngram_entropy, token_accuracy
from kdpo.modeling import IGNORE


def test_token_accuracy_counts_answer_positions_only():
    logits = torch.tensor([[[0.0, 9.0], [9.0, 0.0], [0.0, 9.0]], [[9.0, 0.0], [9.0, 0.0], [9.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 0, 0], [IGNORE, IGNORE, 0]])
    assert token_accuracy(logits, labels).tolist() == [0.5, 1.0]
    assert answer_predictions(logits, labels) == [[0, 1], [0]]


def test_agreement_is_share_of_unchanged_tokens():
    assert agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        agreement([1], [1, 2])


def test_ngram_entropy_matches_easyedit_formula():
    # "a b a b": bigrams (a,b)x2,(b,a)x1 ; trigrams (a,b,a),(b,a,b)
    bigram = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    trigram = 1.0
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * bigram + 4 / 3 * trigram) / 2)


def test_ngram_entropy_of_repetition_is_low():
    assert ngram_entropy("the the the the the the") == 0.0
    assert ngram_entropy("Paris is the capital of France and Rome of Italy") > 3.0


def test_mean_skips_missing():
    assert mean([1.0, None, 0.0]) == 0.5
    assert mean([None]) is None
