"""FT-L: constrained fine-tuning, as the ROME paper's baseline (and EasyEdit's FT-L) does it.

The loss reads every target token off the logits at the *last prompt position* (ROME's
``baselines/ft`` objective; identical to the NLL for one-token targets), and the trained change is
clamped to an L-infinity ball of radius ``norm_constraint`` after every step (with protection
``none`` that is exactly ROME's clamp of the weights around their pre-edit values; with null-space
protection the clamp applies before the projection). With ``weights.minimal_change`` the committed change is
the fit of the trained one to the edit's own keys, clamped again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kdpo.editors.base import Editor, EditorConfig


@dataclass
class FTLConfig(EditorConfig):
    norm_constraint: float = 5e-3

    def validate(self) -> None:
        super().validate()
        if self.norm_constraint <= 0:
            raise ValueError("norm_constraint must be > 0")


class FTLEditor(Editor):
    name = "ft-l"
    Config = FTLConfig

    def edit_loss(self, logits, batch):
        mask = batch.answer_mask
        first = mask.float().argmax(-1)  # position of the last prompt token
        last_prompt_logprobs = logits[torch.arange(len(first)), first].log_softmax(-1)  # [B, V]
        targets = batch.labels.masked_fill(~mask, 0)
        picked = last_prompt_logprobs.gather(-1, targets) * mask
        return -(picked.sum(-1) / mask.sum(-1)).mean()

    def constrain(self, deltas):
        for delta in deltas:
            delta.clamp_(-self.config.norm_constraint, self.config.norm_constraint)
