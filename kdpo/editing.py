"""Sequential editing: N requests applied one after another to the same model, with an explicit schedule.

Evaluation schedule (written into every result): each request is scored right after its own edit
("immediate"), and every request is scored once more after the last edit ("final").
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdpo.config import ConfigError, build_settings, read_settings_file
from kdpo.editors import EDITORS, Editor, EditorConfig
from kdpo.editors.base import find_module, key_covariance
from kdpo.evaluation import PROTOCOL, Probe, RequestScores, evaluate, evaluate_with_answers, probe, summarize
from kdpo.metrics import mean
from kdpo.protection import ProtectedSubspace
from kdpo.requests import EditRequest

SCHEDULE = (
    "immediate: the just-edited request, scored right after its own edit; "
    "final: every request, scored once after the last edit (EasyEdit's sequential protocol)"
)


def make_config(method: str, file: str | Path | None = None, overrides: dict[str, str] | None = None) -> EditorConfig:
    """The method's typed config: defaults, then a YAML/JSON file, then ``key=value`` overrides."""
    if method not in EDITORS:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(EDITORS)}")
    values = read_settings_file(file) if file is not None else {}
    return build_settings(EDITORS[method].Config, values | (overrides or {}), method)


def protected_subspaces(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: EditorConfig, corpus: list[str]
) -> list[ProtectedSubspace]:
    """Null-space protection for the config's modules, from the keys of a corpus the model knows."""
    if not corpus:
        raise ConfigError(
            "protection 'null-space' needs a corpus of text the model knows (a world has one; "
            "otherwise pass --protection-corpus FILE, or --set protection=none)"
        )
    modules = [find_module(model, name) for name in config.modules]
    return [
        ProtectedSubspace.from_key_covariance(covariance, config.null_space_threshold, config.null_space_rule)
        for covariance in key_covariance(model, tokenizer, modules, corpus)
    ]


def build_editor(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, method: str, config: EditorConfig | None = None,
    corpus: list[str] | None = None,
) -> Editor:
    """An editor for ``method``, with its protected subspaces computed where the config asks for them."""
    config = config or make_config(method)
    protected = protected_subspaces(model, tokenizer, config, corpus) if config.protection == "null-space" else None
    return EDITORS[method](model, tokenizer, config, protected)


@dataclass
class EditRecord:
    """One edit of a sequential run: optimisation trace and its immediate scores."""

    index: int
    case_id: str
    steps: int
    seconds: float
    reached: bool
    delta_norm: float
    losses: list[float]
    immediate: RequestScores
    drift: dict[str, float] = field(default_factory=dict)  # per edited module: ||W - W_original||_F


@dataclass
class SequentialResult:
    """Everything a sequential run measured, with the schedule and protocol that produced it."""

    method: str
    config: dict
    records: list[EditRecord]
    final: list[RequestScores]
    baseline: list[RequestScores]
    schedule: str = SCHEDULE
    protocol: dict = field(default_factory=lambda: dict(PROTOCOL))
    answers: list[dict] = field(default_factory=list)  # per request: prompt, targets, greedy answer before/after

    def summary(self) -> dict:
        """Headline figures: immediate and final means, retention, fluency before/after, cost."""
        final_es = [s.edit_success for s in self.final]
        return {
            "method": self.method,
            "edits": len(self.records),
            "immediate": summarize([r.immediate for r in self.records]),
            "final": summarize(self.final),
            "retention": mean(final_es[:-1]) if len(final_es) > 1 else mean(final_es),
            "fluency_before": mean(s.fluency for s in self.baseline),
            "seconds_per_edit": mean(r.seconds for r in self.records),
            "steps_per_edit": mean(r.steps for r in self.records),
            "reached_stop_rule": mean(float(r.reached) for r in self.records),
        }

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "schedule": self.schedule,
            "protocol": self.protocol,
            "config": self.config,
            "records": [  # held: the edit's target is still fully predicted after the last edit
                asdict(r) | {"held": final.edit_success == 1.0} for r, final in zip(self.records, self.final)
            ],
            "final": [asdict(s) for s in self.final],
            "baseline": [asdict(s) for s in self.baseline],
            "answers": self.answers,
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def run_sequential(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    method: str = "kdpo",
    config: EditorConfig | None = None,
    corpus: list[str] | None = None,
    baseline: Probe | None = None,
    fluency_tokens: int = 24,
    progress: bool = True,
    on_edit: Callable[[EditRecord], None] | None = None,
) -> SequentialResult:
    """Apply ``requests`` one after another with ``method``; score immediately and after the last edit."""
    baseline = baseline or probe(model, tokenizer, requests, fluency_tokens)
    editor = build_editor(model, tokenizer, method, config, corpus)
    records = []
    for index, request in enumerate(tqdm(requests, desc=f"{method} edits", disable=not progress, unit="edit")):
        outcome = editor.edit(request)
        immediate = evaluate(model, tokenizer, [request], [baseline.locality_predictions[index]], fluency_tokens=0)[0]
        record = EditRecord(
            index, request.case_id, outcome.steps, outcome.seconds, outcome.reached, outcome.delta_norm,
            outcome.losses, immediate, outcome.drift,
        )
        records.append(record)
        if on_edit is not None:
            on_edit(record)
    final, generations = evaluate_with_answers(model, tokenizer, requests, baseline.locality_predictions, fluency_tokens)
    answers = [
        {"case_id": r.case_id, "prompt": r.prompt, "ground_truth": r.ground_truth, "target_new": r.target_new,
         "before": before, "after": after}
        for r, before, after in zip(requests, baseline.answers, generations)
    ]
    return SequentialResult(method, asdict(editor.config), records, final, baseline.scores, answers=answers)
