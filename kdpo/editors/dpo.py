"""Standard DPO, the KDPO paper's ablation: the negative is the fixed old answer.

The negative sequence is x + ground_truth for every trained row (or, where the request has none, the pre-edit model's greedy
continuation of the prompt, as the paper's ``reg_dpo`` does), scored on its own tokens, with reference
log-probs from one no-grad pass at the start of the edit. The positive NLL is added as in KDPO.
"""
from __future__ import annotations

from dataclasses import dataclass

from kdpo.editors.base import Editor, EditorConfig
from kdpo.losses import answer_nll, dpo_loss, gather_logprobs
from kdpo.modeling import encode_pairs


@dataclass
class DPOConfig(EditorConfig):
    beta: float = 0.1
    nll_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0 or self.nll_weight < 0:
            raise ValueError("beta must be > 0 and nll_weight >= 0")


class DPOEditor(Editor):
    name = "dpo"
    Config = DPOConfig

    def begin_edit(self, facts, batch, logits):
        lengths = batch.answer_mask.sum(-1).tolist()
        pairs = [(fact.prompt, fact.ground_truth or self._greedy_answer(fact.prompt, int(length)))
                 for fact, length in zip(facts, lengths)]
        self.rejected = encode_pairs(self.tokenizer, pairs, self.device).at_answers()
        self.reference_chosen = self._sequence_logprob(logits, batch.labels)
        self.reference_rejected = self._sequence_logprob(self.logits(self.rejected), self.rejected.labels)

    def edit_loss(self, logits, batch):
        policy_rejected = self._sequence_logprob(self.logits(self.rejected), self.rejected.labels)
        logprobs = logits.log_softmax(-1)
        preference = dpo_loss(
            gather_logprobs(logprobs, batch.labels).sum(-1), policy_rejected,
            self.reference_chosen, self.reference_rejected, self.config.beta,
        )
        return preference.mean() + self.config.nll_weight * answer_nll(logprobs, batch.labels)

    @staticmethod
    def _sequence_logprob(logits, labels):
        return gather_logprobs(logits.log_softmax(-1), labels).sum(-1)

    def _greedy_answer(self, prompt: str, length: int) -> str:
        encoded = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        generated = self.model.generate(
            **encoded, max_new_tokens=length, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        return self.tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
