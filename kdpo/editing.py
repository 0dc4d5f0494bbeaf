"""Sequential editing: N requests applied one after another to the same model, with an explicit schedule.

Evaluation schedule (written into every result): each request is scored right after its own edit
("immediate"), and every request is scored once more after the last edit ("final").
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdpo.config import ConfigError, build_settings, read_settings_file
from kdpo.editors import EDITORS, Editor, EditorConfig
from kdpo.evaluation import PROTOCOL, Probe, RequestScores, evaluate, evaluate_with_answers, probe, summarize
from kdpo.keystats import key_covariances
from kdpo.memory import EditMemory
from kdpo.metrics import mean
from kdpo.modeling import load_model, save_edited
from kdpo.protection import ProtectedSubspace
from kdpo.requests import EditRequest
from kdpo.text import without_sentences

SCHEDULE = (
    "immediate: the just-edited request, scored right after its own edit; "
    "final: every request, scored once after the last edit (EasyEdit's sequential protocol)"
)


PRESETS = Path(__file__).parent / "presets"  # named settings files: ``--config paper``


def make_config(method: str, file: str | Path | None = None, overrides: dict[str, str] | None = None) -> EditorConfig:
    """The method's typed config: defaults, then a YAML/JSON file (or a preset name from ``kdpo/presets``),
    then ``key=value`` overrides. Settings a method does not have are skipped for presets only."""
    if method not in EDITORS:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(EDITORS)}")
    values = {}
    if file is not None:
        preset = PRESETS / f"{file}.yaml"
        if not Path(file).exists() and preset.exists():
            known = {f.name for f in fields(EDITORS[method].Config)}
            values = {k: v for k, v in read_settings_file(preset).items() if k in known}
        else:
            values = read_settings_file(file)
    return build_settings(EDITORS[method].Config, values | (overrides or {}), method)


def protected_subspaces(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: EditorConfig, corpus: list[str],
    progress: bool = False,
) -> list[ProtectedSubspace]:
    """Null-space protection for the config's modules, from the keys of a corpus the model knows."""
    if not corpus:
        raise ConfigError(
            "protection 'null-space' needs a corpus of text the model knows (a world has one; "
            "otherwise pass --protection-corpus FILE, or --set protection=none)"
        )
    subspaces = []
    for covariance in key_covariances(model, tokenizer, list(config.weights.modules), corpus, progress=progress):
        subspace = ProtectedSubspace.from_key_covariance(covariance, config.null_space.threshold)
        if config.null_space.corpus_key_weight > 0:  # soft edit keys (validated): the soft fit is where it counts
            subspace.add_soft_covariance(covariance, config.null_space.corpus_key_weight,
                                          config.null_space.commit_ridge)
        subspaces.append(subspace)
    return subspaces


def build_editor(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, method: str, config: EditorConfig | None = None,
    corpus: list[str] | None = None, protected: list[ProtectedSubspace] | None = None,
) -> Editor:
    """An editor for ``method``, with its protected subspaces (given, e.g. by a checkpoint, or computed
    from ``corpus``) where the config asks for them; the edit memory trains on ``corpus`` text too."""
    config = config or make_config(method)
    if protected is None and config.protection == "null-space":
        protected = protected_subspaces(model, tokenizer, config, corpus)
    return EDITORS[method](model, tokenizer, config, protected, corpus)


def memory_editor(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, method: str,
                  corpus: list[str] | None) -> Editor:
    """An editor for the edit memory ``model`` already carries, with that memory's modules and rank (to
    revert its edits, or add to them)."""
    memory = EditMemory.of(model)
    if memory is None:
        raise ConfigError("this model has no edit memory (edit_memory.safetensors)")
    config = make_config(method, overrides={"memory.modules": ",".join(memory.modules), "memory.rank": str(memory.rank)})
    return build_editor(model, tokenizer, method, config, corpus)


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
    cpu_seconds: float = 0.0  # the edit's process CPU time (all threads); 0.0 in checkpoints older than it


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
    protection: list[dict] = field(default_factory=list)  # per edited module: null-space size, key spectrum
    memory: dict | None = None  # the edit memory after the last edit: slots, bytes per edit, gate firing rate

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
            "cpu_seconds_per_edit": mean(r.cpu_seconds for r in self.records),
            "steps_per_edit": mean(r.steps for r in self.records),
            "reached_stop_rule": mean(float(r.reached) for r in self.records),
            "weight_drift": dict(self.records[-1].drift) if self.records else {},
            "memory": self.memory,
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
            "protection": self.protection,
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def withhold_evaluation_text(corpus: list[str] | None, requests: list[EditRequest]) -> list[str] | None:
    """``corpus`` without the sentences that contain an evaluation prompt of ``requests`` (matched on whole
    words), so that generalization and locality are measured on text the editor never trained on or kept."""
    if not corpus:
        return corpus
    prompts = {tuple(prompt.split()) for request in requests for prompt in request.evaluation_prompts}
    lengths = sorted({len(words) for words in prompts if words})

    def evaluated(sentence: str) -> bool:
        words = sentence.split()
        return any(tuple(words[i:i + n]) in prompts for n in lengths for i in range(len(words) - n + 1))

    return without_sentences(corpus, evaluated)


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
    resume: Checkpoint | None = None,
    checkpoint_every: int = 25,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
) -> SequentialResult:
    """Apply ``requests`` one after another with ``method``; score immediately and after the last edit.

    Resuming: ``model`` is the checkpoint's model, ``resume`` its records and editor state, and
    ``baseline`` the probe of the model before the first edit (required: the edited model is not it).
    ``on_checkpoint`` gets the run's state after every ``checkpoint_every`` edits and after the last one.
    The editor gets ``corpus`` without the requests' evaluation text (:func:`withhold_evaluation_text`).
    """
    if resume is not None:
        _check_resume(resume, requests, baseline)
    if on_checkpoint is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    baseline = baseline or probe(model, tokenizer, requests, fluency_tokens)
    corpus = withhold_evaluation_text(corpus, requests)
    editor = build_editor(model, tokenizer, method, config, corpus, resume.protected if resume else None)
    if resume is not None and resume.original_weights is not None:
        editor.original_weights = resume.original_weights  # drift stays measured from the unedited model
    records = list(resume.records) if resume else []
    protected_at_start = [subspace.rank for subspace in editor.protected or []]
    locality_tokens = baseline.locality_generations  # None for probes made before they were recorded
    todo = range(len(records), len(requests))
    for index in tqdm(todo, desc=f"{method} edits", disable=not progress, unit="edit", initial=len(records),
                      total=len(requests)):
        request = requests[index]
        outcome = editor.edit(request)
        immediate = evaluate(model, tokenizer, [request], [baseline.locality_predictions[index]], fluency_tokens=0,
                             baseline_generations=locality_tokens and [locality_tokens[index]])[0]
        record = EditRecord(
            index, request.case_id, outcome.steps, outcome.seconds, outcome.reached, outcome.delta_norm,
            outcome.losses, immediate, outcome.drift, outcome.cpu_seconds,
        )
        records.append(record)
        if on_edit is not None:
            on_edit(record)
        if on_checkpoint is not None and (len(records) % checkpoint_every == 0 or len(records) == len(requests)):
            on_checkpoint(Checkpoint(list(records), copy.deepcopy(editor.protected), editor.original_weights))
    if editor.memory is not None:
        editor.memory.reset_counters()  # the gate firing rate is reported for the final evaluation
    final, generations = evaluate_with_answers(model, tokenizer, requests, baseline.locality_predictions,
                                               fluency_tokens, baseline_generations=locality_tokens)
    answers = [
        {"case_id": r.case_id, "prompt": r.prompt, "ground_truth": r.ground_truth, "target_new": r.target_new,
         "before": before, "after": after}
        for r, before, after in zip(requests, baseline.answers, generations)
    ]
    return SequentialResult(
        method, asdict(editor.config), records, final, baseline.scores, answers=answers,
        protection=protection_report(editor, protected_at_start),
        memory=editor.memory.stats() if editor.memory else None,
    )


def protection_report(editor: Editor, protected_at_start: list[int]) -> list[dict]:
    """Per edited module: its key dimension, how many directions were protected before the first edit and
    after the last, the rank of the soft memory of committed edits' keys (``edit_keys: soft``), and the
    eigen-spectrum of K0^T K0 (descending) the null space was chosen from."""
    return [
        {"module": name, "dim": subspace.dim, "protected_at_start": start, "protected_at_end": subspace.rank,
         "free_at_end": subspace.dim - subspace.rank,
         "soft_memory_rank": 0 if subspace.key_gram is None else int(torch.linalg.matrix_rank(subspace.key_gram)),
         "spectrum": [] if subspace.spectrum is None else [float(v) for v in subspace.spectrum]}
        for name, subspace, start in zip(editor.config.weights.modules, editor.protected or [], protected_at_start)
    ]


# --- resuming -------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A sequential run part-way: the finished edits' records and the editor's state across edits
    (protected subspaces, the weights drift is measured from). The next edit is ``records``' length."""

    records: list[EditRecord]
    protected: list[ProtectedSubspace] | None = None
    original_weights: list[torch.Tensor] | None = None

    @property
    def next_edit(self) -> int:
        return len(self.records)


def _check_resume(resume: Checkpoint, requests: list[EditRequest], baseline: Probe | None) -> None:
    """A checkpoint resumes only the run it came from, with that run's baseline probe."""
    if baseline is None:
        raise ValueError("resume needs the baseline probe of the model before the first edit (pass baseline=)")
    if resume.next_edit > len(requests):
        raise ValueError(f"checkpoint has {resume.next_edit} edits done, but there are only {len(requests)} requests")
    for record, request in zip(resume.records, requests):
        if record.case_id != request.case_id:
            raise ValueError(f"checkpoint record {record.index} is case_id {record.case_id!r}, "
                             f"but request {record.index} is {request.case_id!r}: not the same run")


def save_checkpoint(
    root: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, checkpoint: Checkpoint
) -> Path:
    """Write ``root/checkpoint-NNNNNN`` (NNNNNN = edits done) atomically: a temporary directory renamed
    into place, so a crash mid-write leaves the previous checkpoint; older ones are then removed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".writing-"))
    save_edited(model, tokenizer, staging)
    torch.save({
        "protected": None if checkpoint.protected is None else [s.state_dict() for s in checkpoint.protected],
        "original_weights": checkpoint.original_weights,
    }, staging / "editor_state.pt")
    records = {"next_edit": checkpoint.next_edit, "records": [asdict(r) for r in checkpoint.records]}
    (staging / "records.json").write_text(json.dumps(records))
    target = root / f"checkpoint-{checkpoint.next_edit:06d}"
    staging.rename(target)
    for stale in [*root.glob("checkpoint-*"), *root.glob(".writing-*")]:
        if stale != target:
            shutil.rmtree(stale)
    return target


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint with the most edits done under ``root``, or None; the temporary folders of saves that
    were killed part-way are removed (the caller is the only writer: it holds the refresh's lock)."""
    for stale in Path(root).glob(".writing-*"):
        shutil.rmtree(stale)
    found = sorted(Path(root).glob("checkpoint-*"))
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path, device: str = "cpu", dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Checkpoint]:
    """The edited model (on ``device``, in ``dtype``), its tokenizer and the run state of a
    :func:`save_checkpoint` directory."""
    model, tokenizer = load_model(path, device, dtype)
    state = torch.load(Path(path) / "editor_state.pt", weights_only=True)
    records = [
        EditRecord(**r | {"immediate": RequestScores(**r["immediate"])})
        for r in json.loads((Path(path) / "records.json").read_text())["records"]
    ]
    protected = None if state["protected"] is None else [ProtectedSubspace.from_state_dict(s) for s in state["protected"]]
    return model, tokenizer, Checkpoint(records, protected, state["original_weights"])
