"""The editing losses against values computed by hand."""
import math

import pytest
import torch

from kdpo.losses import (
    answer_margin,
    answer_nll,
    dpo_loss,
    gather_logprobs,
    kdpo_loss,
    teacher_forced_negatives,
)
from kdpo.modeling import IGNORE

# one sequence, 3 positions, vocabulary of 4; positions 1 and 2 predict the answer tokens 2 and 1
LABELS = torch.tensor([[IGNORE, 2, 1]])
LOGITS = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0], [0.5, 4.0, 1.0, 0.0]]])
REFERENCE_LOGITS = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]]])


def log_softmax(row, index):
    return row[index] - math.log(sum(math.exp(v) for v in row))


def test_teacher_forced_negative_is_current_argmax_and_masks_agreement():
    negatives = teacher_forced_negatives(LOGITS, LABELS)
    # position 1: argmax 3 differs from the positive 2; position 2: argmax 1 equals the positive -> masked
    assert negatives.tolist() == [[IGNORE, 3, IGNORE]]


def test_dpo_loss_matches_formula():
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.0]), beta=0.5)
    margin = (-1.0 + 2.0) - (-1.5 + 1.0)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * margin))))


def test_kdpo_loss_by_hand():
    beta, nll_weight = 0.1, 1.0
    negatives = teacher_forced_negatives(LOGITS, LABELS)
    loss = kdpo_loss(LOGITS.log_softmax(-1), REFERENCE_LOGITS.log_softmax(-1), LABELS, negatives, beta, nll_weight)
    pos1, ref1 = LOGITS[0, 1].tolist(), REFERENCE_LOGITS[0, 1].tolist()
    # only position 1 contrasts: chosen token 2 against the current argmax 3
    h = (log_softmax(pos1, 2) - log_softmax(pos1, 3)) - (log_softmax(ref1, 2) - log_softmax(ref1, 3))
    preference = -math.log(1 / (1 + math.exp(-beta * h)))
    nll = -(log_softmax(pos1, 2) + log_softmax(LOGITS[0, 2].tolist(), 1)) / 2
    assert loss.item() == pytest.approx(preference + nll, rel=1e-5)


def test_kdpo_loss_is_ln2_when_nothing_contrasts_and_no_nll():
    agreeing = torch.tensor([[[0.0] * 4, [0.0, 0.0, 5.0, 0.0], [0.0, 5.0, 0.0, 0.0]]])
    negatives = teacher_forced_negatives(agreeing, LABELS)
    loss = kdpo_loss(agreeing.log_softmax(-1), agreeing.log_softmax(-1), LABELS, negatives, 0.1, 0.0)
    assert loss.item() == pytest.approx(math.log(2))


def test_kdpo_gradient_pushes_negative_down_and_positive_up():
    logits = LOGITS.clone().requires_grad_(True)
    negatives = teacher_forced_negatives(logits, LABELS)
    kdpo_loss(logits.log_softmax(-1), REFERENCE_LOGITS.log_softmax(-1), LABELS, negatives, 0.1, 0.0).backward()
    assert logits.grad[0, 1, 2] < 0 < logits.grad[0, 1, 3]  # descent raises token 2, lowers token 3


def test_answer_nll_and_gather():
    logprobs = LOGITS.log_softmax(-1)
    assert gather_logprobs(logprobs, LABELS)[0, 0].item() == 0.0
    expected = -(log_softmax(LOGITS[0, 1].tolist(), 2) + log_softmax(LOGITS[0, 2].tolist(), 1)) / 2
    assert answer_nll(logprobs, LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_answer_margin():
    assert answer_margin(LOGITS, LABELS).tolist() == pytest.approx([2.0 - 3.0, 4.0 - 1.0])
