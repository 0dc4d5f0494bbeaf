"""KDPO: Knowledge Direct Preference Optimization (Rozner et al., arXiv 2406.09920).

Where we follow the paper and its official code:
- positive = the new target under teacher forcing; negative = the model's *current* teacher-forced
  prediction at each target position, regenerated from the very forward pass of every step (online);
- chosen and rejected log-probs are both read off the positive sequence's logits; positions where the
  negative equals the positive are masked;
- the reference is the model as it was before this edit, summed per-token log-probs, beta = 0.1.
Where we chose (the settings are DPO's, :class:`~kdpo.editors.dpo.DPOConfig`):
- the reference is kept as log-probs over the whole vocabulary at the target positions, read off the first
  step's pass, before anything changed (the code deep-copies the model); with teacher forcing on the fixed
  positive, these are exactly the reference terms for any negative the online regeneration picks;
- negatives are regenerated every step (the code: every 8-step "cycle");
- the positive NLL (``nll_weight``) is real (the code's config names it but never uses it);
- the stop rule is a logit margin at every target token (margin 0 = the paper's "target is argmax");
- edits are optimised as a projected delta (see :mod:`kdpo.editors.base`), never applied twice.
"""
from __future__ import annotations

from kdpo.editors.base import Editor
from kdpo.editors.dpo import DPOConfig
from kdpo.losses import kdpo_loss, teacher_forced_negatives


class KDPOEditor(Editor):
    name = "kdpo"
    Config = DPOConfig

    def begin_edit(self, facts, batch, logits):
        self.reference_logprobs = logits.log_softmax(-1)

    def edit_loss(self, logits, batch):
        negatives = teacher_forced_negatives(logits, batch.labels)
        return kdpo_loss(
            logits.log_softmax(-1), self.reference_logprobs, batch.labels, negatives,
            self.config.beta, self.config.nll_weight,
        )
