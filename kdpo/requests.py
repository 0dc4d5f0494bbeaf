"""The one typed record every editor, loader and metric speaks: an edit request."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class PromptAnswer:
    """A prompt with the answer expected from the model (a locality or portability probe)."""

    prompt: str
    ground_truth: str


@dataclass(frozen=True)
class Fact:
    """What an editor may read of a request: the prompt, its new answer and the old one where known.
    Never evaluation data (rephrases, locality, portability)."""

    case_id: str
    subject: str
    prompt: str
    target_new: str
    ground_truth: str | None = None


@dataclass(frozen=True)
class EditRequest:
    """One fact to change: make the model complete ``prompt`` with ``target_new``.

    ``ground_truth`` is the old answer where the data has it. ``rephrase_prompts`` test
    generalization, ``locality`` items must keep their answers, ``portability`` items test
    whether the edit carries over to related questions.
    """

    case_id: str
    subject: str
    prompt: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[PromptAnswer, ...] = ()
    portability: tuple[PromptAnswer, ...] = ()

    @property
    def fact(self) -> Fact:
        """The part of the request an editor trains on."""
        return Fact(self.case_id, self.subject, self.prompt, self.target_new, self.ground_truth)

    @property
    def evaluation_prompts(self) -> tuple[str, ...]:
        """The prompts generalization, locality and portability are measured on (never an editor's input)."""
        return (*self.rephrase_prompts, *(item.prompt for item in (*self.locality, *self.portability)))

    def to_dict(self) -> dict:
        """The project's JSONL record for this request."""
        record = asdict(self)
        record["rephrase_prompts"] = list(self.rephrase_prompts)
        record["locality"] = [asdict(item) for item in self.locality]
        record["portability"] = [asdict(item) for item in self.portability]
        return record

    @classmethod
    def from_dict(cls, record: dict) -> "EditRequest":
        """Inverse of :meth:`to_dict` for records already checked by a loader."""
        return cls(
            case_id=str(record["case_id"]),
            subject=record["subject"],
            prompt=record["prompt"],
            target_new=record["target_new"],
            ground_truth=record.get("ground_truth"),
            rephrase_prompts=tuple(record.get("rephrase_prompts") or ()),
            locality=tuple(PromptAnswer(**item) for item in record.get("locality") or ()),
            portability=tuple(PromptAnswer(**item) for item in record.get("portability") or ()),
        )


@dataclass
class SkippedRecord:
    """A record a loader left out under ``skip_invalid``, and why."""

    index: int
    case_id: str | None
    field: str | None
    message: str


@dataclass
class LoadedRequests:
    """What a loader returns: the valid requests and, with ``skip_invalid``, what it skipped."""

    requests: list[EditRequest]
    skipped: list[SkippedRecord] = field(default_factory=list)
    format: str = ""
