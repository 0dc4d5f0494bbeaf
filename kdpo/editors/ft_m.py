"""FT-M: EasyEdit's fine-tuning with the loss masked to the target tokens (teacher-forced NLL)."""
from __future__ import annotations

from kdpo.editors.base import Editor
from kdpo.losses import answer_nll


class FTMEditor(Editor):
    name = "ft-m"

    def edit_loss(self, logits, batch):
        return answer_nll(logits.log_softmax(-1), batch.labels)
