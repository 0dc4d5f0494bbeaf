"""Loading a causal LM and turning (prompt, answer) pairs into teacher-forced batches."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from kdpo.memory import EditMemory
from kdpo.requests import EditRequest

transformers_logging.disable_progress_bar()  # our own bars say what is going on; weight loading is instant

IGNORE = -100  # label value of positions that carry no answer token
CORPUS = "corpus.txt"  # the text a kdpo model knows: later edits train and protect with it
CARRIED = (CORPUS, "edits.jsonl")  # what a kdpo model carries beside its weights: its corpus and default edits


class ModelLoadError(RuntimeError):
    """A model path or hub id that cannot be loaded (named in the message)."""


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (cuda when available) as a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def load_model(
    name_or_path: str | Path, device: str = "cpu", dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any Hugging Face causal LM (a local directory or, with network, a hub id), with the edit memory
    saved beside it (see :mod:`kdpo.memory`)."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a causal LM from {name_or_path!s}: {error}") from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.to(resolve_device(device))
    model.eval()
    if Path(name_or_path).is_dir():
        EditMemory.load(model, name_or_path)
    return model, tokenizer


def save_edited(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path,
    source: str | Path | None = None, new_facts: Sequence[EditRequest] = (),
) -> None:
    """Write an edited model as a Hugging Face directory: weights, tokenizer, its edit memory (if any), and the
    files a kdpo model carries from ``source`` (``CARRIED``), with ``new_facts`` appended to a carried corpus so
    that later edits train and protect with them too.

    The files are written into a staging folder and then moved in one by one, so ``directory`` may be the
    model's own (``source``): the weights it was loaded from are never overwritten while they are read."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.saving-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        memory = EditMemory.of(model)
        if memory is not None:
            memory.save(staging)
        for name in CARRIED:
            if source is not None and (Path(source) / name).is_file():
                shutil.copy(Path(source) / name, staging / name)
        if new_facts and (staging / CORPUS).exists():
            with open(staging / CORPUS, "a") as handle:
                handle.writelines(f"{r.prompt} {r.target_new}.\n" for r in new_facts)
        for path in staging.iterdir():
            os.replace(path, directory / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class TeacherForcedBatch:
    """Right-padded sequences ``prompt + " " + answer``.

    ``labels[b, t]`` is the answer token that ``logits[b, t]`` must predict, or ``IGNORE``; so answer scoring is
    a gather at the label positions of one forward pass. With ``columns`` (see :meth:`at_answers`) the labels
    are compact: ``labels[b, k]`` is what the logits at column ``columns[b, k]`` of ``input_ids`` must predict.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    columns: torch.Tensor | None = None

    def to(self, device: torch.device) -> "TeacherForcedBatch":
        columns = None if self.columns is None else self.columns.to(device)
        return TeacherForcedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                                  columns)

    @property
    def answer_mask(self) -> torch.Tensor:
        return self.labels != IGNORE

    def at_answers(self) -> "TeacherForcedBatch":
        """The batch with compact labels: only its answer positions are read (see :class:`Logits`)."""
        if self.columns is not None:
            return self
        columns, _ = columns_of(self.answer_mask)
        return TeacherForcedBatch(self.input_ids, self.attention_mask, self.labels.gather(1, columns), columns)


def columns_of(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of each row's True entries of ``mask`` [B, T], in order and left-aligned, as [B, K] (K: the
    most in a row), and which of them are real: a shorter row is padded with columns where ``mask`` is False."""
    counts = mask.sum(1)
    width = int(counts.max()) if mask.numel() else 0
    columns = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    return columns, torch.arange(width, device=mask.device)[None, :] < counts[:, None]


class Logits:
    """A causal LM's float32 logits where a loss reads them. The body runs over every token; the output head
    (on a small model with a large vocabulary most of the work and the memory) and everything done with its
    output only at the chosen columns. Models whose logits are more than the output embedding of the body's
    last hidden state (scaled or capped logits) are detected once and get the whole logits, then picked."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.split = _head_splits(model)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What :meth:`at` reads logits from: the body's last hidden states, or the whole logits."""
        if self.split:
            return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def at(self, states: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The logits at ``columns`` [B, K] of each row of ``states``: [B, K, V]."""
        return self._read(states.gather(1, columns[..., None].expand(-1, -1, states.shape[-1])))

    def at_each(self, states: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The logits at each position ``(rows[i], columns[i])`` of ``states``: [N, V]."""
        return self._read(states[rows, columns])

    def _read(self, picked: torch.Tensor) -> torch.Tensor:
        """float32 logits of states picked from :meth:`states`' output."""
        return (self.model.get_output_embeddings()(picked) if self.split else picked).float()

    def __call__(self, batch: TeacherForcedBatch) -> torch.Tensor:
        """One forward pass over a compact ``batch`` (:meth:`TeacherForcedBatch.at_answers`): the logits at its
        ``columns``, [B, K, V], as its labels are laid out."""
        return self.at(self.states(batch.input_ids, batch.attention_mask), batch.columns)


class LayerSkip:
    """The body of a model run from after decoder layer ``after``, given that layer's output: the layers up to it
    stand aside for the pass (:meth:`given`) and return the given states. A memory slot's training uses it when
    all the slot's modules are in one layer and add their output to its residual stream: their change then only
    adds to that layer's output, so the layers below run once per edit, not once per step."""

    def __init__(self, layers: torch.nn.ModuleList, after: int):
        self.layers, self.after = layers, after

    @classmethod
    @torch.no_grad()
    def after_modules(cls, model: PreTrainedModel, modules: list[torch.nn.Module]) -> "LayerSkip | None":
        """The skip past the decoder layer that holds every one of ``modules``, checked on a few tokens: a change
        added to each module's output reaches the layer's output unchanged, and a pass given the layer's output
        ends as the whole pass does. None where that does not hold (or the layers are not found)."""
        body = model.base_model
        lists = [m for m in body.children() if isinstance(m, torch.nn.ModuleList)]
        if len(lists) != 1:
            return None
        layers = lists[0]
        holders = {next((i for i, layer in enumerate(layers) if any(m is module for m in layer.modules())), None)
                   for module in modules}
        if len(holders) != 1 or None in holders:
            return None
        skip = cls(layers, holders.pop())
        ids = torch.arange(1, 9, device=next(model.parameters()).device)[None, :] % model.config.vocab_size
        embedded = body.get_input_embeddings()(ids)  # not input_ids: an edit memory's gates stay out of the check
        whole, state = skip._run_whole(body, embedded)
        if not isinstance(state, torch.Tensor) or state.dtype not in (torch.float32, torch.float64):
            return None  # in half precision a small response of the layer to the change hides in the rounding
        scale = float(state.abs().max())
        rounding = 16 * torch.finfo(state.dtype).eps  # a few roundings of the largest value: any real difference is
        # of the size of the change itself
        generator = torch.Generator().manual_seed(0)  # not the global one: building an editor draws nothing
        for module in modules:
            change = (torch.randn(state.shape, generator=generator, dtype=state.dtype) * scale).to(state.device)

            def add_change(m, args, output):
                return output + change if output.shape == change.shape else output

            handle = module.register_forward_hook(add_change)
            try:
                _, changed = skip._run_whole(body, embedded)
            finally:
                handle.remove()
            if not torch.allclose(changed - state, change, rtol=0, atol=rounding * 2 * scale):
                return None
        with skip.given(state):
            resumed = body(inputs_embeds=state).last_hidden_state
        return skip if torch.allclose(resumed, whole, rtol=0, atol=rounding * float(whole.abs().max())) else None

    def _run_whole(self, body: torch.nn.Module, embedded: torch.Tensor) -> tuple[torch.Tensor, object]:
        """The body's last hidden states and layer ``after``'s output, on the token embeddings ``embedded``."""
        captured = []
        handle = self.layers[self.after].register_forward_hook(lambda m, args, output: captured.append(output))
        try:
            return body(inputs_embeds=embedded).last_hidden_state, captured[0]
        finally:
            handle.remove()

    @contextmanager
    def given(self, state: torch.Tensor):
        """For the passes inside: layer ``after`` outputs ``state`` and the layers before it do nothing; the
        body's input only sets the dtype, so pass ``inputs_embeds=state``."""
        stand_in, kept = _Given(state), list(self.layers[: self.after + 1])
        try:
            for i in range(self.after + 1):
                self.layers[i] = stand_in
            yield
        finally:
            for i, layer in enumerate(kept):
                self.layers[i] = layer


class _Given(torch.nn.Module):
    """Stands in for decoder layers: returns the given states, whatever it is passed."""

    def __init__(self, state: torch.Tensor):
        super().__init__()
        self.state = state

    def forward(self, hidden_states, *args, **kwargs):
        return self.state


@torch.no_grad()
def _head_splits(model: PreTrainedModel) -> bool:
    """Whether ``model``'s logits are its output embedding of its body's last hidden state (Llama- and
    GPT-2-shaped models; not models that scale or cap their logits), checked on a few tokens."""
    head, body = model.get_output_embeddings(), model.base_model
    if head is None or body is model:
        return False
    ids = torch.arange(1, 9, device=next(model.parameters()).device)[None, :] % model.config.vocab_size
    whole = model(input_ids=ids).logits.float()
    try:
        split = head(body(input_ids=ids).last_hidden_state).float()
    except (AttributeError, TypeError):
        return False
    return split.shape == whole.shape and torch.allclose(split, whole, rtol=1e-3, atol=1e-3 * float(whole.abs().max()))


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Token ids of ``" " + answer``, as the answer follows its prompt (EasyEdit's convention)."""
    return tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], device: torch.device | None = None
) -> TeacherForcedBatch:
    """Teacher-forced batch of (prompt, answer) pairs; prompt and answer are tokenized apart."""
    rows, label_rows = [], []
    for prompt, answer in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = answer_token_ids(tokenizer, answer)
        ids = prompt_ids + target_ids
        labels = [IGNORE] * len(ids)
        for offset, token in enumerate(target_ids):
            labels[len(prompt_ids) + offset - 1] = token
        rows.append(ids)
        label_rows.append(labels)
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = torch.tensor([row + [IGNORE] * (width - len(row)) for row in label_rows])
    batch = TeacherForcedBatch(input_ids, attention, labels)
    return batch.to(device) if device is not None else batch


def chunks(items: list, size: int):
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
