"""The editing losses as small pure functions, to be read against the KDPO paper (arXiv 2406.09920).

Notation: for an edit with prompt x and positive (new target) y = y_1..y_T, the model is run once with
teacher forcing on x+y; ``logprobs[t]`` is log p(. | x, y_<t) at the position that predicts y_t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpo.modeling import IGNORE


def gather_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) at every position; 0 where ``tokens`` is IGNORE. Shapes [B, L, V], [B, L] -> [B, L]."""
    safe = tokens.clamp_min(0)
    picked = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(tokens == IGNORE, 0.0)


def teacher_forced_negatives(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's current belief at each answer position, under teacher forcing on the positive prefix (the
    paper's code): n_t = argmax_v p(v | x, y_<t); positions where n_t == y_t are set to IGNORE, so they
    contribute nothing (the paper's Figure 2: shared tokens cancel)."""
    negatives = logits.detach().argmax(-1)
    return negatives.masked_fill((labels == IGNORE) | (negatives == labels), IGNORE)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * [(pi_c - pi_r) - (ref_c - ref_r)]), per example.

    Inputs are summed sequence log-probs, shape [B].
    """
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    return -F.logsigmoid(beta * margin)


def kdpo_loss(
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    labels: torch.Tensor,
    negatives: torch.Tensor,
    beta: float,
    nll_weight: float,
) -> torch.Tensor:
    """KDPO for a batch of edits, mean over the batch.

    Chosen and rejected are both read off the positive sequence's logits (teacher forcing), summed over
    M = {t : n_t != y_t}:  h = sum_M [log p(y_t) - log p(n_t)] - sum_M [log p_ref(y_t) - log p_ref(n_t)],
    loss = -log sigmoid(beta h) + nll_weight * mean_t[-log p(y_t)].
    The NLL of the positive is our choice (the paper names it, its code does not use it): it keeps the
    positive itself likely rather than only ahead of the current negative.
    """
    contrast = negatives != IGNORE
    chosen_labels = labels.masked_fill(~contrast, IGNORE)
    preference = dpo_loss(
        gather_logprobs(logprobs, chosen_labels).sum(-1),
        gather_logprobs(logprobs, negatives).sum(-1),
        gather_logprobs(reference_logprobs, chosen_labels).sum(-1),
        gather_logprobs(reference_logprobs, negatives).sum(-1),
        beta,
    )
    return preference.mean() + nll_weight * answer_nll(logprobs, labels)


def answer_nll(logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the answer tokens (FT-M's loss: masked to the target)."""
    mask = labels != IGNORE
    return -gather_logprobs(logprobs, labels).sum() / mask.sum().clamp_min(1)


def answer_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per answer position: logit of the label minus the best other logit (> 0 means the label is argmax).

    Returns a flat tensor over the answer positions of the batch.
    """
    mask = labels != IGNORE
    label_logit = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.clamp_min(0).unsqueeze(-1), float("-inf")).amax(-1)
    return (label_logit - others)[mask]


def kl_to_reference(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) per position, averaged over the positions. [N, V] each."""
    return (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1).mean()
