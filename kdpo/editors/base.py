"""The one editor interface: every method is a loss plugged into the same optimisation loop.

An edit lives in one of two places (``protection``):
- ``memory`` (default): the subject's slot of the edit memory (:mod:`kdpo.memory`), a low-rank change that
  acts only where the subject is mentioned; the base weights are never changed. The slot is trained on the
  subject's facts, each also behind random corpus text, with the method's loss, plus a KL term that keeps
  corpus text about the subject as the model without the slot predicts it.
- the weights (``null-space`` or ``none``): a fresh additive change ``delta`` on the input side of each
  edited linear module (``y = W x + (P x)^T D``) is trained and then committed; protection (``P``, see
  :mod:`kdpo.protection`) is a projection, and a constraint (FT-L) is a clamp on ``D``.

An editor reads only a request's :class:`~kdpo.requests.Fact` (subject, prompt, target_new, ground_truth),
never its evaluation data.
"""
from __future__ import annotations

import copy
import inspect
import math
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdpo.layers import find_module, input_output_dims
from kdpo.losses import answer_margin, kl_to_reference
from kdpo.memory import EditMemory, holds_pattern, sentence_end_ids, subject_patterns
from kdpo.modeling import IGNORE, LayerSkip, Logits, TeacherForcedBatch, columns_of, encode_pairs
from kdpo.protection import ProtectedSubspace
from kdpo.requests import EditRequest, Fact
from kdpo.text import goes_on_after, without_sentences

PROTECTIONS = ("memory", "null-space", "none")
CONTEXT_COPIES = 2  # memory: each fact is also trained behind this many random corpus lines
PRESERVED_TEXTS = 16  # memory: at most this many corpus lines about the subject are kept as they were
EDIT_KEY_MODES = ("soft", "hard")


@dataclass
class MemorySettings:
    """Edits in the edit memory (``protection: memory``)."""

    modules: tuple[str, ...] = ("layers.1.mlp.down_proj",)  # the modules a slot changes
    rank: int = 4
    lr: float = 8e-2  # Adam's step size for a slot (1,000 edits: 9.3 steps an edit against 13.3 at 4e-2, LOC as
    # good; at 1.6e-1 LOC and fluency drop; see docs/benchmarks.md)
    preserve_weight: float = 16.0  # weight of the KL that keeps corpus text about the subject unchanged (at 1.0
    # a slot changed 15% of the answers it is gated on that are not its own; see docs/benchmarks.md)
    hold_confidence: float = 0.5  # done only when every preserved prediction the model without the slot makes
    # with at least this probability keeps its greedy token (0: only each answer's next token); see docs/memory.md


@dataclass
class WeightSettings:
    """Edits in the weights (``protection: null-space`` or ``none``)."""

    modules: tuple[str, ...] = ("layers.0.mlp.down_proj", "layers.1.mlp.down_proj")
    lr: float = 1e-2  # Adam's step size for the weight changes
    minimal_change: bool = True  # commit only the part of the change the edit's own sequence uses


@dataclass
class NullSpaceSettings:
    """Null-space protection of edits in the weights (``protection: null-space``)."""

    threshold: float = 1e-3  # protect the leading key directions holding 99.9% of K0's energy
    protect_edit_keys: bool = True
    edit_keys: str = "soft"  # how committed edits' keys are kept: "soft" (least squares) or "hard" (barred span)
    edit_key_weight: float = 1.0  # soft: weight of a past edit's key against the new edit's own keys
    commit_ridge: float = 1e-2  # soft: ridge of the least-squares fit of the committed change
    corpus_key_weight: float = 0.0  # soft: weight of each corpus key outside the null space in the fit


@dataclass
class EditorConfig:
    """Settings every editor shares; each place an edit can live has its own block. Module names match as
    suffixes of ``model.named_modules()``."""

    max_steps: int = 40
    stop_margin: float = 4.0
    protection: str = "memory"  # where an edit lives: "memory" (subject-gated slots), or the weights with
    # "null-space" protection or "none"
    memory: MemorySettings = field(default_factory=MemorySettings)
    weights: WeightSettings = field(default_factory=WeightSettings)
    null_space: NullSpaceSettings = field(default_factory=NullSpaceSettings)

    def validate(self) -> None:
        if self.protection not in PROTECTIONS:
            raise ValueError(f"protection must be one of {PROTECTIONS}, got {self.protection!r}")
        ignored = [block for block in self.ignored_blocks() if getattr(self, block) != type(getattr(self, block))()]
        if ignored:
            raise ValueError(f"the {' and '.join(ignored)} settings have no effect with protection {self.protection!r}: "
                             "leave them out")
        memory, weights, null_space = self.memory, self.weights, self.null_space
        if not 0.0 < null_space.threshold < 1.0:
            raise ValueError(f"null_space.threshold must be in (0, 1), got {null_space.threshold}")
        if null_space.edit_keys not in EDIT_KEY_MODES:
            raise ValueError(f"null_space.edit_keys must be one of {EDIT_KEY_MODES}, got {null_space.edit_keys!r}")
        if self.protection == "null-space" and null_space.edit_keys == "soft" and not weights.minimal_change:
            raise ValueError("null_space.edit_keys 'soft' remembers softly through the fitted commit, so it needs "
                             "weights.minimal_change true")
        if null_space.edit_keys == "hard" and null_space.corpus_key_weight:
            raise ValueError("null_space.corpus_key_weight acts in the soft fit only: it needs edit_keys 'soft'")
        if null_space.edit_key_weight <= 0 or null_space.commit_ridge <= 0:
            raise ValueError("null_space.edit_key_weight and null_space.commit_ridge must be > 0")
        if null_space.corpus_key_weight < 0:
            raise ValueError(f"null_space.corpus_key_weight must be >= 0, got {null_space.corpus_key_weight}")
        if memory.lr <= 0 or weights.lr <= 0 or self.max_steps < 1:
            raise ValueError("memory.lr and weights.lr must be > 0 and max_steps >= 1")
        if not weights.modules or not memory.modules:
            raise ValueError("weights.modules and memory.modules must name at least one linear module to edit")
        if memory.rank < 1 or memory.preserve_weight < 0:
            raise ValueError("memory.rank must be >= 1 and memory.preserve_weight >= 0")
        if not 0.0 <= memory.hold_confidence <= 1.0:
            raise ValueError(f"memory.hold_confidence must be in [0, 1], got {memory.hold_confidence}")

    @property
    def edited_modules(self) -> tuple[str, ...]:
        """The modules an edit changes: the memory's, or the weights'."""
        return self.memory.modules if self.protection == "memory" else self.weights.modules

    def ignored_blocks(self) -> tuple[str, ...]:
        """The blocks of settings this protection never reads (setting one is a mistake, rejected by ``validate``)."""
        if self.protection == "memory":
            return ("weights", "null_space")
        return ("memory",) + (("null_space",) if self.protection == "none" else ())


@dataclass
class EditOutcome:
    """What one edit did: optimisation steps, wall time, loss curve, whether the stop rule was met."""

    steps: int
    seconds: float
    losses: list[float]
    reached: bool
    delta_norm: float
    drift: dict[str, float] = field(default_factory=dict)  # per module: ||W - W_original||_F after the edit
    cpu_seconds: float = 0.0  # process CPU time, all threads (other processes on the machine disturb it less)


def restrict_to_keys(delta: torch.Tensor, keys: torch.Tensor, rank_tolerance: float = 1e-6) -> torch.Tensor:
    """The smallest change with the same effect on ``keys`` [n, in]: ``delta`` [in, out] projected onto the
    span of the keys (``k @ result == k @ delta`` for every key row ``k``). A trained change also moves
    directions the edit never uses; only the other inputs of the model see those, so committing them can
    only hurt."""
    keys = keys.float()
    left, singular, _ = torch.linalg.svd(keys.T, full_matrices=False)  # left: [in, n]
    basis = left[:, singular > rank_tolerance * singular.max().clamp_min(1e-30)]
    return basis @ (basis.T @ delta)


class _InputsCaptured(Exception):
    """Raised by ``module_inputs``' hooks once every module has seen its input, to end the forward pass."""


@torch.no_grad()
def module_inputs(model: PreTrainedModel, modules: list[torch.nn.Module], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """The input of each module in a forward pass of ``model``, which stops as soon as every module has seen
    its input: the layers above the deepest one and the output head (on a large model most of the work,
    and with a large vocabulary most of the memory) are never run."""
    captured: dict[int, torch.Tensor] = {}

    def recorder(index: int):
        def record(module, args):
            captured.setdefault(index, args[0].detach())
            if len(captured) == len(modules):
                raise _InputsCaptured
        return record

    handles = [module.register_forward_pre_hook(recorder(i)) for i, module in enumerate(modules)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    except _InputsCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) < len(modules):
        raise RuntimeError(f"{len(modules) - len(captured)} of the edited modules never ran in the model's forward pass")
    return [captured[i] for i in range(len(modules))]


class Editor(ABC):
    """Applies one edit request at a time to ``model``, in place. Subclasses define the loss."""

    name: ClassVar[str]
    Config: ClassVar[type[EditorConfig]] = EditorConfig

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EditorConfig | None = None,
        protected: list[ProtectedSubspace] | None = None,
        corpus: list[str] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or self.Config()
        self.config.validate()
        self.corpus = corpus or []
        self.memory = None
        if self.config.protection == "memory":
            ends = () if EditMemory.of(model) else sentence_end_ids(tokenizer)  # a memory it has keeps its own
            self.memory = EditMemory.attach(model, self.config.memory.modules, self.config.memory.rank, ends)
        elif EditMemory.of(model) is not None:
            raise ValueError("this model carries an edit memory: edit it with protection 'memory', so that the "
                             "memory's edits and weight edits do not overlap unseen")
        self.module_names = self.config.edited_modules
        self.modules = [find_module(model, name) for name in self.module_names]
        if self.config.protection == "null-space" and protected is None:
            raise ValueError("protection 'null-space' needs protected key subspaces (see kdpo.editing.protect)")
        self.protected = protected if self.config.protection == "null-space" else None
        self.device = next(model.parameters()).device
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.logits = Logits(model)  # an editor's losses read the logits at answer positions only
        self.skip = None  # a slot's training runs the layers below the memory's once per edit, where it can
        if self.memory is not None and self.logits.split:
            self.skip = LayerSkip.after_modules(model, self.memory.layers)
        self.original_weights = [module.weight.detach().clone() for module in self.modules]

    # --- what a method defines -------------------------------------------------------------
    def begin_edit(self, facts: list[Fact], batch: TeacherForcedBatch, logits: torch.Tensor) -> None:
        """Per-edit preparation (reference log-probs, fixed negatives), given the fact of each row of
        ``batch`` (compact: its labels are at its answer ``columns``, and ``self.logits(batch)`` reads those) and
        the model's logits there before the edit. Runs without gradients, before the first step's loss."""

    @abstractmethod
    def edit_loss(self, logits: torch.Tensor, batch: TeacherForcedBatch) -> torch.Tensor:
        """The loss of the current step, from the positive sequence's logits at the answer columns of ``batch``."""

    def constrain(self, deltas: list[torch.Tensor]) -> None:
        """Project the trained weight deltas back onto the method's feasible set after a step."""

    # --- the shared loop -------------------------------------------------------------------
    def reached(self, logits: torch.Tensor, batch: TeacherForcedBatch) -> bool:
        """Stop rule: every target token is the argmax by at least ``stop_margin`` nats."""
        margins = answer_margin(logits.detach(), batch.labels)
        return bool((margins > self.config.stop_margin).all()) if margins.numel() else True

    def edit(self, request: EditRequest) -> EditOutcome:
        """Make the model answer the request's prompt with its target: train the subject's memory slot, or
        optimise a weight change until the stop rule holds (or ``max_steps``) and commit it."""
        fact = request.fact  # all an editor reads of the request
        cpu_started = time.process_time()
        outcome = self._edit_memory(fact) if self.memory is not None else self._edit_weights(fact)
        outcome.cpu_seconds = time.process_time() - cpu_started
        return outcome

    # --- the edit memory ---------------------------------------------------------------------
    def _edit_memory(self, fact: Fact) -> EditOutcome:
        """Train the subject's slot on all its facts; a fact with the same case_id or prompt is replaced."""
        started = time.perf_counter()
        slot = self.memory.slot_of(fact.subject)
        patterns = subject_patterns(self.tokenizer, fact.subject) if slot is None else self.memory.slots[slot].patterns
        if not holds_pattern(self.tokenizer(fact.prompt, add_special_tokens=False)["input_ids"], patterns):
            raise ValueError(f"case_id {fact.case_id}: field 'subject': {fact.subject!r} is not among the prompt's "
                             "tokens, so no memory gate can open on it")
        if slot is None:
            slot = self.memory.add_slot(fact.subject, patterns)
        kept = [f for f in self.memory.slots[slot].facts if f.case_id != fact.case_id and f.prompt != fact.prompt]
        self.memory.slots[slot].facts = [*kept, fact]
        return self._train_slot(slot, started)

    def revert(self, case_id: str) -> bool:
        """Take one edit back out of the memory: its slot is retrained from zero on the subject's other facts,
        or dropped if it held no other. False if no slot holds ``case_id``."""
        if self.memory is None:
            raise ValueError("only edits in the edit memory can be reverted (protection 'memory')")
        found = self.memory.find_fact(case_id)
        if found is None:
            return False
        slot = found[0]
        rest = [f for f in self.memory.slots[slot].facts if f.case_id != case_id]
        if not rest:
            self.memory.remove_slot(slot)
            return True
        self.memory.slots[slot].facts = rest
        self.memory.reset_slot(slot)
        self._train_slot(slot, time.perf_counter())
        return True

    def _train_slot(self, slot: int, started: float) -> EditOutcome:
        facts = self.memory.slots[slot].facts
        training_rows = self._training_rows(facts)
        edits = encode_pairs(self.tokenizer, [(f.prompt, f.target_new) for f in training_rows], self.device)
        batch = edits.at_answers()
        preserved = self._preserved_text(facts, slot)
        parameters = self.memory.trainable(slot)
        losses: list[float] = []
        try:
            with torch.no_grad():
                # one pass a step runs the edit rows and, below them, the kept text's rows
                edit_count, pad = len(edits.input_ids), self.tokenizer.pad_token_id
                texts, openings = [edits], [self.memory.first_opening(edits.input_ids, slot)]
                if preserved is not None:
                    texts, openings = texts + [preserved.text], openings + [preserved.openings]
                passes = _SlotPasses(self.logits, self.memory, slot, *_stacked(texts, pad), torch.cat(openings), pad,
                                     self.skip)
                answer_columns = passes.local(batch.columns, torch.arange(edit_count, device=self.device)[:, None])
                if preserved is not None:
                    kept_rows, at = preserved.kept.nonzero(as_tuple=True)  # the kept positions, without the padding
                    rows = kept_rows + edit_count
                    columns = passes.local(preserved.text.columns[kept_rows, at], rows)
                    reference = self.logits.at_each(passes.without_slot(), rows, columns).log_softmax(-1)
                    held = preserved.held[kept_rows, at] | _confident(reference, self.config.memory.hold_confidence)
                    now = preserved.now[kept_rows]  # other slots' facts: kept as the model says them now

            def forward() -> tuple[torch.Tensor, torch.Tensor | None]:
                states = passes()
                kept = None if preserved is None else self.logits.at_each(states, rows, columns)
                return self.logits.at(states[:edit_count], answer_columns), kept

            def done(logits: torch.Tensor, kept: torch.Tensor | None) -> bool:  # the edit is made, each answered
                return self.reached(logits, batch) and (  # sentence still ends where it did, and the confident
                    kept is None or _same_argmax(kept, reference, held))  # preserved predictions stay

            optimizer = torch.optim.Adam(parameters, lr=self.config.memory.lr)
            reached = False
            for step in range(self.config.max_steps):
                logits, kept = forward()
                if not step and preserved is not None:  # the first pass is the model now, this slot as it was
                    reference = torch.where(now[:, None], kept.detach().log_softmax(-1), reference)
                if done(logits, kept):
                    reached = True
                    break
                if not step:
                    with torch.no_grad():
                        self.begin_edit(training_rows, batch, logits.detach())
                loss = self.edit_loss(logits, batch)
                if preserved is not None:
                    kl = kl_to_reference(kept.log_softmax(-1), reference) * preserved.share
                    loss = loss + self.config.memory.preserve_weight * kl
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            else:
                with torch.no_grad():
                    reached = done(*forward())
        finally:
            self.memory.store()
        return EditOutcome(len(losses), time.perf_counter() - started, losses, reached,
                           self.memory.change_norm(slot), self.drift())

    def _training_rows(self, facts: list[Fact]) -> list[Fact]:
        """Each fact as asked, and behind ``CONTEXT_COPIES`` random corpus lines (seeded by its case_id), so
        the slot's change holds wherever the subject appears in a longer text."""
        rows = []
        for fact in facts:
            rows.append(fact)
            if self.corpus:
                draw = random.Random(fact.case_id)
                rows += [Fact(fact.case_id, fact.subject, f"{draw.choice(self.corpus)} {fact.prompt}",
                              fact.target_new, fact.ground_truth) for _ in range(CONTEXT_COPIES)]
        return rows

    def _preserved_text(self, facts: list[Fact], slot: int) -> "_PreservedText | None":
        """Text whose predictions slot ``slot`` must leave as they were (see :class:`_PreservedText`): up to
        ``PRESERVED_TEXTS`` corpus lines that mention the subject, less their sentences that hold an answer its
        facts change (the subject's other facts, as the model knew them), and each fact answered and followed
        by a corpus line, all but its answer: the slot must change neither how the prompt goes on after the
        subject (or a later mention runs into the answer: "Robert Frost Hungary Hungary ...") nor how the text
        goes on after the answer. And up to ``PRESERVED_TEXTS`` facts of other slots whose prompt or answer opens
        this slot's gate, all held as the model says them now, this slot's change as it was: another subject's
        slot was trained beside this one's ("Orlando is a city in France" and the slot of France), so a
        retrained slot must not move what that fact's sentence says (else: "... in France France France")."""
        if not self.config.memory.preserve_weight:
            return None
        subject, patterns = facts[0].subject.strip(), self.memory.slots[slot].patterns
        changed = [f.ground_truth for f in facts if f.ground_truth] + [f.target_new for f in facts]
        about = without_sentences((line for line in self.corpus if subject in line),
                                  lambda sentence: any(answer in sentence for answer in changed))
        # the lines the slot's gate opens on: "located" holds the text of the subject "cat", not its tokens
        named = [line for line in about if subject in line]
        tokens = self.tokenizer(named, add_special_tokens=False)["input_ids"] if named else []
        lines = [line for line, ids in zip(named, tokens) if holds_pattern(ids, patterns)]
        lines = random.Random(subject).sample(lines, len(lines))
        if len(lines) > PRESERVED_TEXTS:  # first the lines where a sentence goes on after the subject, where the
            # slot could change the subject's other facts ("United States is a country in"), not only name it
            lines = sorted(lines, key=lambda line: not goes_on_after(line, subject))[:PRESERVED_TEXTS]
        crossing = self._crossing_facts(slot)
        first_crossing = len(lines)
        lines += [f"{fact.prompt} {fact.target_new}" for fact in crossing]
        answers, starts = [0] * len(lines), [0] * len(lines)  # per row, [answers, starts) predict the answer
        for fact in facts:
            answered = f"{fact.prompt} {fact.target_new}"
            following = f" {random.Random(fact.case_id).choice(self.corpus)}" if self.corpus else ""
            lines.append(f"{answered}.{following}")
            answers.append(len(self.tokenizer(fact.prompt)["input_ids"]) - 1)
            starts.append(len(self.tokenizer(answered)["input_ids"]) - 1)  # the position after the answer
        encoded = self.tokenizer(lines, return_tensors="pt", padding=True, padding_side="right").to(self.device)
        ids, attention = encoded["input_ids"], encoded["attention_mask"]
        positions = torch.arange(ids.shape[1], device=self.device)[None, :]
        answers, starts = torch.tensor(answers, device=self.device), torch.tensor(starts, device=self.device)
        preserved = attention.bool() & ((positions < answers[:, None]) | (positions >= starts[:, None]))
        row = torch.arange(len(lines), device=self.device)
        now = (row >= first_crossing) & (row < first_crossing + len(crossing))
        # the slot changes nothing before it opens: the KL there is exactly zero, so only the rest is computed
        openings = self.memory.first_opening(ids, slot)
        columns, kept = columns_of(preserved & (positions >= openings[:, None]))
        answered = (row >= len(lines) - len(facts))[:, None]
        held = (answered & (columns == starts[:, None]) | now[:, None]) & kept
        text = TeacherForcedBatch(ids, attention, torch.full_like(columns, IGNORE), columns)
        share = float(kept.sum() / preserved[~now].sum().clamp_min(1))  # other slots' facts add, not dilute
        return _PreservedText(text, kept, held, share, openings, now)

    def _crossing_facts(self, slot: int) -> list[Fact]:
        """Up to ``PRESERVED_TEXTS`` facts of other slots whose prompt or answer opens slot ``slot``'s gate (a
        random draw, seeded by the subject, where there are more)."""
        subject, patterns = self.memory.slots[slot].subject, self.memory.slots[slot].patterns
        named = [fact for index, other in enumerate(self.memory.slots) if index != slot for fact in other.facts
                 if subject in f"{fact.prompt} {fact.target_new}"]
        if not named:
            return []
        tokens = self.tokenizer([f"{fact.prompt} {fact.target_new}" for fact in named],
                                add_special_tokens=False)["input_ids"]
        opening = [fact for fact, ids in zip(named, tokens) if holds_pattern(ids, patterns)]
        return random.Random(subject).sample(opening, min(len(opening), PRESERVED_TEXTS))

    # --- weight edits ------------------------------------------------------------------------
    def _edit_weights(self, fact: Fact) -> EditOutcome:
        started = time.perf_counter()
        encoded = encode_pairs(self.tokenizer, [(fact.prompt, fact.target_new)], self.device)
        batch = encoded.at_answers()
        projectors = self.protected or [None] * len(self.modules)
        deltas = [
            torch.zeros(input_output_dims(m)[0], input_output_dims(m)[1], device=self.device, requires_grad=True)
            for m in self.modules
        ]
        handles = [
            module.register_forward_hook(self._delta_hook(delta, projector))
            for module, delta, projector in zip(self.modules, deltas, projectors)
        ]
        losses: list[float] = []
        try:
            optimizer = torch.optim.Adam(deltas, lr=self.config.weights.lr)
            reached = False
            for step in range(self.config.max_steps):
                logits = self.logits(batch)
                if self.reached(logits, batch):
                    reached = True
                    break
                if not step:
                    with torch.no_grad():
                        self.begin_edit([fact], batch, logits.detach())
                loss = self.edit_loss(logits, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    self.constrain(deltas)
                losses.append(loss.item())
            else:
                with torch.no_grad():
                    reached = self.reached(self.logits(batch), batch)
            if self.config.weights.minimal_change:
                key_rows = [inputs[batch.attention_mask.bool()]
                            for inputs in module_inputs(self.model, self.modules, encoded.input_ids,
                                                           encoded.attention_mask)]
        finally:
            for handle in handles:
                handle.remove()
        if self.config.weights.minimal_change:
            with torch.no_grad():
                deltas = [
                    self._fit_change(delta, keys if projector is None else projector.project(keys.float()), projector)
                    for delta, keys, projector in zip(deltas, key_rows, projectors)
                ]
                self.constrain(deltas)  # the method's feasible set holds for what is committed, too
        delta_norm = self._commit(deltas, projectors)
        if self.protected and self.config.null_space.protect_edit_keys:
            self._protect_edit_keys(fact)
        if self._soft:  # the fitted change may fall short of the trained one
            with torch.no_grad():
                reached = self.reached(self.logits(batch), batch)
        return EditOutcome(len(losses), time.perf_counter() - started, losses, reached, delta_norm, self.drift())

    @property
    def _soft(self) -> bool:
        return bool(self.protected) and self.config.null_space.protect_edit_keys and self.config.null_space.edit_keys != "hard"

    @torch.no_grad()
    def drift(self) -> dict[str, float]:
        """Frobenius distance of each edited matrix from the weights it had when the editor was made (0.0 for
        the memory's modules: an edit in the memory leaves them as they are)."""
        return {
            name: float((module.weight - original).float().norm())
            for name, module, original in zip(self.module_names, self.modules, self.original_weights)
        }

    @staticmethod
    def _delta_hook(delta: torch.Tensor, projector: ProtectedSubspace | None):
        def hook(module, args, output):
            keys = args[0].float()
            if projector is not None:
                keys = projector.project(keys)
            return output + (keys @ delta).to(output.dtype)

        return hook

    def _fit_change(self, delta: torch.Tensor, keys: torch.Tensor, projector: ProtectedSubspace | None) -> torch.Tensor:
        """The change to commit, given the trained ``delta`` [in, out] and the edit's own (projected) keys.

        Hard or no edit-key protection: the smallest change with the same effect on the edit's keys.
        Soft: the least-squares change X that keeps the trained effect on the edit's keys K and disturbs
        committed edits' keys (Gram G, see :meth:`ProtectedSubspace.add_soft_keys`) least:
        min ||K X - K delta||^2 + tr(X^T G X) + ridge ||X||^2, i.e. X = (K^T K + G + ridge I)^-1 K^T K delta.
        """
        if not self._soft or projector is None or projector.soft_inverse is None:
            return restrict_to_keys(delta, keys)
        return projector.fit_change(keys, delta)

    @torch.no_grad()
    def _commit(self, deltas: list[torch.Tensor], projectors: list[ProtectedSubspace | None]) -> float:
        total = 0.0
        for module, delta, projector in zip(self.modules, deltas, projectors):
            change = delta if projector is None else projector.project(delta.T).T  # P @ D, (in, out)
            if isinstance(module, torch.nn.Linear):
                change = change.T
            module.weight += change.to(module.weight.dtype)
            total += float(change.norm()) ** 2
        return total**0.5

    @torch.no_grad()
    def _protect_edit_keys(self, fact: Fact) -> None:
        """Remember the committed edit's keys (its prompt, at every target position), so later edits leave
        this one alone: barred from their span (hard) or fitted around them (soft)."""
        batch = encode_pairs(self.tokenizer, [(fact.prompt, fact.target_new)], self.device)
        mask = batch.answer_mask
        for subspace, inputs in zip(self.protected, module_inputs(self.model, self.modules, batch.input_ids,
                                                                   batch.attention_mask)):
            if self.config.null_space.edit_keys == "soft":
                subspace.add_soft_keys(inputs[mask], self.config.null_space.edit_key_weight,
                                       self.config.null_space.commit_ridge)
            else:
                subspace.add_keys(inputs[mask])


class _SlotPasses:
    """The forward passes of slot ``slot``'s training over one fixed batch ``input_ids`` [B, T]. A row's tokens
    before the slot opens (``openings`` [B], see :meth:`EditMemory.first_opening`) never change, so only the rest
    of each row runs every pass. With a ``skip`` past the slot's layer (:class:`~kdpo.modeling.LayerSkip`), every
    row runs once, whole and without the slot; each pass adds the slot's change to that layer's output and runs
    the layers above on the rows' rest, its real tokens laid end to end in one row (each attends to its own row's
    earlier tokens only, the ones before the opening from the cache of that first run). Without a skip, the tokens
    before each row's opening run once, into a KV cache, and each pass runs the rest of every row, left-aligned
    (the prefixes left-padded to a common end, with their true positions). Models whose logits are read whole
    (:class:`~kdpo.modeling.Logits`) run every token."""

    def __init__(self, logits: Logits, memory: EditMemory, slot: int, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, openings: torch.Tensor, pad: int, skip: LayerSkip | None = None):
        self.logits, self.memory, self.slot, self.skip = logits, memory, slot, skip
        self.input_ids, self.attention_mask, self.openings = input_ids, attention_mask, openings
        self.start = int(self.openings.max()) if logits.split else 0
        if not self.start:  # nothing to cache
            self.skip, self.openings = None, torch.zeros_like(self.openings)
            return
        body = logits.model.base_model
        self.cache_name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
        if skip is not None:
            self._run_once(body, skip)
            return
        shift = self.start - self.openings  # each row moves right by this
        width = int((shift + attention_mask.sum(1)).max())
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] + shift[:, None]
        ids = input_ids.new_full((len(input_ids), width + input_ids.shape[1]), pad)
        mask = attention_mask.new_zeros(ids.shape)
        ids.scatter_(1, columns, input_ids)
        mask.scatter_(1, columns, attention_mask)
        self.ids, self.mask = ids[:, :width], mask[:, :width]
        self.positions = (torch.arange(width, device=ids.device)[None, :] - shift[:, None]).clamp_min(0)
        prefix = body(input_ids=self.ids[:, : self.start], attention_mask=self.mask[:, : self.start],
                      position_ids=self.positions[:, : self.start], use_cache=True)
        self.cache, self.gates = prefix[self.cache_name], memory.gate_state()

    def _run_once(self, body: torch.nn.Module, skip: LayerSkip) -> None:
        """Run every row once, whole, without the slot: its last states (:meth:`without_slot`), the KV cache, the
        slot's layer's output and each of the slot's modules' input where the slot is open (what its change is
        made of); then pack what the passes read. The passes' states keep the batch's columns."""
        inputs, below = [], []
        handles = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
                   for layer in self.memory.layers]
        handles.append(skip.layers[skip.after].register_forward_hook(lambda m, args, output: below.append(output)))
        try:
            with self.memory.muted(self.slot):
                whole = body(input_ids=self.input_ids, attention_mask=self.attention_mask, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        rows, length = self.input_ids.shape
        open_at = self.memory.open_at(self.slot, rows, length)[..., None]
        columns = torch.arange(length, device=self.input_ids.device)[None, :]
        real = self.attention_mask.bool()
        prefix, rest = real & (columns < self.openings[:, None]), real & (columns >= self.openings[:, None])
        self.muted, self.openings = whole.last_hidden_state, torch.zeros_like(self.openings)
        self.rest_at = rest.nonzero(as_tuple=True)  # (row, column) of each packed token, row by row
        self.shape = whole.last_hidden_state.shape
        token_rows, prefix_rows = self.rest_at[0], prefix.nonzero(as_tuple=True)[0]
        seen = token_rows[:, None] == torch.cat([prefix_rows, token_rows])[None, :]  # its own row's prefix and rest,
        seen[:, len(prefix_rows):].tril_()  # the rest up to itself
        state = below[0]
        self.packed_mask = torch.zeros(seen.shape, dtype=state.dtype, device=state.device).masked_fill(
            ~seen, torch.finfo(state.dtype).min)[None, None]
        self.packed_positions = columns.expand(rows, -1)[rest][None]
        self.packed_cache = whole[self.cache_name]
        for layer in self.packed_cache.layers:  # [B, heads, T, d] -> [1, heads, tokens before the openings, d]
            layer.keys, layer.values = (t.transpose(1, 2)[prefix].transpose(0, 1)[None] for t in (layer.keys, layer.values))
        self.below, self.inputs = state[rest][None], [(x.float() * open_at)[rest][None] for x in inputs]

    def without_slot(self) -> torch.Tensor:
        """What a pass returns with the slot muted: what its training keeps to."""
        if self.skip is not None:
            return self.muted
        with self.memory.muted(self.slot):
            return self()

    def __call__(self) -> torch.Tensor:
        """The body's last hidden states of every row from its opening on: column k of row r is the batch's
        column ``openings[r] + k`` (see :meth:`local`; with a skip, the batch's columns themselves)."""
        if not self.start:
            return self.logits.states(self.input_ids, self.attention_mask)
        body = self.logits.model.base_model
        if self.skip is None:
            self.memory.restore_gate(self.gates)
            return body(input_ids=self.ids[:, self.start:], attention_mask=self.mask,
                        position_ids=self.positions[:, self.start:], use_cache=True,
                        **{self.cache_name: copy.deepcopy(self.cache)}).last_hidden_state
        a, b = self.memory.slot_tensors(self.slot)
        change = sum(x @ a_m @ b_m for x, a_m, b_m in zip(self.inputs, a, b))
        state = self.below + change.to(self.below.dtype)
        with self.skip.given(state):
            packed = body(inputs_embeds=state, attention_mask=self.packed_mask, position_ids=self.packed_positions,
                          use_cache=True, **{self.cache_name: _continuable(self.packed_cache)}).last_hidden_state
        return packed.new_zeros(self.shape).index_put(self.rest_at, packed[0])

    def local(self, columns: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Columns of the batch, in ``rows`` (of the same shape, or broadcast), as columns of what a pass returns."""
        return (columns - self.openings[rows]).clamp_min(0)  # a padded entry may lie before the opening: any column


def _stacked(texts: list[TeacherForcedBatch], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input ids and attention masks of ``texts``' rows, one under the other, right-padded to one width."""
    width = max(text.input_ids.shape[1] for text in texts)
    return tuple(torch.cat([torch.nn.functional.pad(getattr(text, name), (0, width - text.input_ids.shape[1]), value=value)
                            for text in texts]) for name, value in (("input_ids", pad), ("attention_mask", 0)))


def _continuable(cache):
    """A copy of a KV cache that a pass can extend while ``cache`` stays as it is: each layer's ``update``
    replaces its tensors (``torch.cat``), so the tensors themselves need no copy."""
    fresh = copy.copy(cache)
    fresh.layers = [copy.copy(layer) for layer in cache.layers]
    return fresh


@dataclass
class _PreservedText:
    """Text a slot's training keeps as the model without the slot predicts it (the rows marked ``now``: as the
    model predicts it now): ``text`` (its ``columns``: the positions from where the slot opens on, for an
    answered fact all but those that predict its answer), which of those ``kept`` are real (a shorter row is
    padded), and the ``held`` ones whose greedy token must stay for the edit to count as done (each answer's next
    token: the sentence still ends where it did; every kept token of a ``now`` row)."""

    text: TeacherForcedBatch
    kept: torch.Tensor
    held: torch.Tensor
    share: float  # kept positions over the preserved ones but other slots' facts (the KL is a mean over the latter)
    openings: torch.Tensor  # per row, where the slot first opens
    now: torch.Tensor  # per row, whether it is another slot's fact, kept as the model says it now (not muted)


def _confident(reference: torch.Tensor, confidence: float) -> torch.Tensor:
    """Where the reference log-probabilities [..., V] give their greedy token at least probability ``confidence``
    (nowhere for 0)."""
    greedy = reference.max(-1).values
    return greedy >= math.log(confidence) if confidence else torch.zeros_like(greedy, dtype=torch.bool)


def _same_argmax(logits: torch.Tensor, reference: torch.Tensor, where: torch.Tensor) -> bool:
    """Whether the greedy token of ``logits`` equals the reference's at every position of the mask ``where``."""
    return bool((logits.argmax(-1) == reference.argmax(-1))[where.bool()].all())
