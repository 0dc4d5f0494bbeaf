"""The edit memory: edits that live beside the base weights, each active only where its subject is.

One *slot* per edited subject holds, for every edited module, a low-rank change ``x @ A_s @ B_s`` added to
the module's output from a mention of the subject to the end of its sentence (the position before the next
sentence-ending token: ``.``, ``!`` or a line break; not ``?``, whose answer follows it and is part of the
subject's statement); elsewhere the model is exactly the base model.
A mention is a match of one of the subject's token sequences (``subject`` and
``" " + subject`` as the tokenizer writes them) in ``input_ids``, found for the whole batch at once with
rolling hashes (a loop over pattern lengths, never over tokens) and checked token by token.

The gate follows a sequence through ``model.generate`` with a KV cache: the memory keeps each row's open
slots and its last tokens between steps, so a subject seen in the prompt or in an earlier step keeps its
slot open until its sentence ends, and a subject whose tokens are generated across steps still opens it.

Saved next to the Hugging Face files as ``edit_memory.safetensors``: the A and B of every slot, with the
index (modules, rank, and each slot's subject, token patterns and facts) in the file's metadata.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kdpo.layers import find_module, input_output_dims
from kdpo.requests import Fact

MEMORY_FILE = "edit_memory.safetensors"
HASH_BASE = 1_000_003  # < 2**20, so (hash * base + token id) stays inside int64 for any vocabulary below 2**20
HASH_MODULUS = 4_398_046_511_093  # the largest prime below 2**42
INIT_SCALE = 0.01  # A starts as N(0, INIT_SCALE^2) and B as zero, so a new slot changes nothing until trained
NEVER = torch.iinfo(torch.long).max  # the close of a gate whose sentence has not ended yet
PUNCTUATION = ".,;:!?'\")"  # what a subject can end in that may merge with the next token


@dataclass
class Slot:
    """An edited subject: its token patterns and the facts its change was trained on."""

    subject: str
    patterns: list[list[int]]
    facts: list[Fact] = field(default_factory=list)


@dataclass
class _PatternTable:
    """All subject patterns, sorted by hash: token rows padded with -1, their lengths and slots."""

    hashes: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    owners: torch.Tensor
    duplicates: bool  # whether two patterns share a hash


@dataclass
class _OpenSlots:
    """The (row, slot) gates of the current sequences, open at absolute positions ``starts <= p < closes``."""

    rows: torch.Tensor
    slots: torch.Tensor
    starts: torch.Tensor
    closes: torch.Tensor
    past: int  # absolute position of the current forward pass's first token

    def spans(self, length: int) -> torch.Tensor:
        """[gates, length]: 1.0 where each gate is open over the current pass's ``length`` positions."""
        positions = self.past + torch.arange(length, device=self.starts.device)[None, :]
        return ((positions >= self.starts[:, None]) & (positions < self.closes[:, None])).float()


def prefix_hashes(tokens: torch.Tensor) -> torch.Tensor:
    """Polynomial hash of every prefix of the last dimension: [..., L] -> [..., L], entry j hashing tokens 0..j."""
    hashes, running = [], torch.zeros(tokens.shape[:-1], dtype=torch.long, device=tokens.device)
    for offset in range(tokens.shape[-1]):  # a loop over pattern length, not over tokens
        running = (running * HASH_BASE + tokens[..., offset]) % HASH_MODULUS
        hashes.append(running)
    return torch.stack(hashes, -1)


def subject_patterns(tokenizer, subject: str) -> list[list[int]]:
    """The token sequences that mention ``subject``: as written alone and after a space; a subject that ends in
    punctuation also without it, since the punctuation can merge with what follows ("Goin' Ape!" + "?" -> "!?")."""
    name = subject.strip()
    bare = name.rstrip(PUNCTUATION)
    forms = [name, " " + name] + ([bare, " " + bare] if bare and bare != name else [])
    patterns = []
    for text in forms:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids not in patterns:
            patterns.append(ids)
    return patterns


def holds_pattern(ids: list[int], patterns: list[list[int]]) -> bool:
    """Whether one of ``patterns`` occurs in ``ids`` (one text's tokens; the gate's batched search is ``mentions``)."""
    return any(ids[i:i + len(p)] == p for p in patterns for i in range(len(ids) - len(p) + 1))


def sentence_end_ids(tokenizer) -> list[int]:
    """The tokens that end a subject's statement: their text ends with ``.`` or ``!``, or holds a line break. Not
    ``?``: in "Which company makes X? Y." the answer Y after the question is what an edit of X changes."""
    texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
    return [token for token, text in enumerate(texts) if text.rstrip(" ").endswith((".", "!")) or "\n" in text]


class EditMemory:
    """Subject-gated low-rank changes to the outputs of ``modules`` of ``model`` (see the module docstring).

    ``attach`` makes one and hooks it into the model (``model.edit_memory``); the slot tensors grow by
    doubling, so adding a slot is amortised O(1)."""

    def __init__(self, model: torch.nn.Module, modules: tuple[str, ...], rank: int, sentence_ends: list[int]):
        self.model, self.modules, self.rank = model, tuple(modules), rank
        self.sentence_ends = sorted(set(sentence_ends))
        self.layers = [find_module(model, name) for name in self.modules]
        self.dims = [input_output_dims(layer) for layer in self.layers]
        device = next(model.parameters()).device
        self.A = [torch.zeros(0, d_in, rank, device=device) for d_in, _ in self.dims]
        self.B = [torch.zeros(0, rank, d_out, device=device) for _, d_out in self.dims]
        self.slots: list[Slot] = []
        self._slot_of: dict[str, int] = {}
        self._table: _PatternTable | None = None
        self._ends_table: torch.Tensor | None = None  # token id -> whether it ends a sentence
        self._open: _OpenSlots | None = None
        self._tail: torch.Tensor | None = None  # each row's last tokens, for mentions that span decoding steps
        self._training: tuple[int, list[torch.Tensor], list[torch.Tensor]] | None = None
        self._muted: int | None = None
        self.sequences_seen = 0
        self.sequences_gated = 0
        self._handles: list = []
        self.hook()

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: torch.nn.Module, modules: tuple[str, ...], rank: int,
               sentence_ends: list[int] = ()) -> "EditMemory":
        """The model's memory: the one it has (its modules and rank must match), else a new, empty one whose
        gates close at ``sentence_ends`` (token ids, see :func:`sentence_end_ids`; none: at the text's end)."""
        memory = cls.of(model)
        if memory is None:
            memory = cls(model, modules, rank, list(sentence_ends))
        elif (memory.modules, memory.rank) != (tuple(modules), rank):
            raise ValueError(f"the model's edit memory has rank {memory.rank} on {list(memory.modules)}; the settings "
                             f"ask for rank {rank} on {list(modules)}: use the memory's settings")
        return memory

    @staticmethod
    def of(model: torch.nn.Module) -> "EditMemory | None":
        return getattr(model, "edit_memory", None)

    def hook(self) -> None:
        """Hook the memory into its model (``model.edit_memory``); a new memory is hooked already."""
        if self._handles:
            return
        # on the body, so that a pass that stops before the output head (see kdpo.modeling.Logits) is gated too
        self._handles = [self.model.base_model.register_forward_pre_hook(self._gate_hook, with_kwargs=True)]
        self._handles += [layer.register_forward_hook(self._change_hook(i)) for i, layer in enumerate(self.layers)]
        self.model.edit_memory = self

    def detach(self) -> None:
        """Remove the hooks: the model is the base model again (``hook`` puts the memory back)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.of(self.model) is self:
            del self.model.edit_memory

    def slot_of(self, subject: str) -> int | None:
        return self._slot_of.get(subject.strip())

    def add_slot(self, subject: str, patterns: list[list[int]]) -> int:
        """A new, empty slot for ``subject`` (its change is zero until trained)."""
        if not patterns:
            raise ValueError(f"subject {subject!r} has no tokens to match")
        index = len(self.slots)
        if index == self.A[0].shape[0]:
            capacity = max(8, 2 * index)
            self.A = [torch.cat([a, a.new_zeros(capacity - index, *a.shape[1:])]) for a in self.A]
            self.B = [torch.cat([b, b.new_zeros(capacity - index, *b.shape[1:])]) for b in self.B]
        self.reset_slot(index)
        self.slots.append(Slot(subject.strip(), [list(p) for p in patterns]))
        self._slot_of[subject.strip()] = index
        self._table = None
        return index

    def remove_slot(self, index: int) -> None:
        """Drop a slot; the last slot takes its index."""
        last = len(self.slots) - 1
        for tensors in (self.A, self.B):
            for t in tensors:
                t[index] = t[last]
                t[last].zero_()
        del self._slot_of[self.slots[index].subject]
        self.slots[index] = self.slots[last]
        self.slots.pop()
        if index < last:
            self._slot_of[self.slots[index].subject] = index
        self._table = None

    def reset_slot(self, index: int) -> None:
        """Start a slot's change afresh (zero), as a new slot starts."""
        generator = torch.Generator().manual_seed(index)
        for a in self.A:
            a[index] = (torch.randn(a.shape[1:], generator=generator) * INIT_SCALE).to(a.device)
        for b in self.B:
            b[index].zero_()

    def find_fact(self, case_id: str) -> tuple[int, Fact] | None:
        for index, slot in enumerate(self.slots):
            for fact in slot.facts:
                if fact.case_id == case_id:
                    return index, fact
        return None

    # --- training --------------------------------------------------------------------------------
    def trainable(self, index: int) -> list[torch.Tensor]:
        """Copies of slot ``index``'s tensors that require grad; the gate uses them until ``store`` is called."""
        a = [t[index].detach().clone().requires_grad_(True) for t in self.A]
        b = [t[index].detach().clone().requires_grad_(True) for t in self.B]
        self._training = (index, a, b)
        return a + b

    def store(self) -> None:
        """Write the trained tensors back into their slot and end training."""
        index, a, b = self._training
        with torch.no_grad():
            for target, trained in zip(self.A + self.B, a + b):
                target[index] = trained.detach()
        self._training = None

    def slot_tensors(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Slot ``index``'s A and B per module: the copies in training (see :meth:`trainable`), else the stored."""
        if self._training is not None and self._training[0] == index:
            return self._training[1], self._training[2]
        return [a[index] for a in self.A], [b[index] for b in self.B]

    def open_at(self, index: int, rows: int, length: int) -> torch.Tensor:
        """[rows, length]: 1.0 where slot ``index`` was open in the last forward pass, else 0."""
        opened = self._open
        where = torch.zeros(rows, length, device=self.A[0].device)
        if opened is None:
            return where
        mine = opened.slots == index
        return where.index_add_(0, opened.rows[mine], opened.spans(length)[mine]).clamp_max_(1.0)

    @contextmanager
    def muted(self, index: int):
        """The model with slot ``index``'s change off (what the slot's training preserves)."""
        self._muted = index
        try:
            yield
        finally:
            self._muted = None

    def change_norm(self, index: int) -> float:
        """Frobenius norm of the slot's A @ B, summed in quadrature over modules."""
        return float(sum((a[index] @ b[index]).square().sum() for a, b in zip(self.A, self.B)) ** 0.5)

    # --- the gate --------------------------------------------------------------------------------
    def _pattern_table(self) -> _PatternTable:
        """Every slot's patterns, sorted by hash (built once per change of the slots)."""
        if self._table is None:
            items = [(pattern, index) for index, slot in enumerate(self.slots) for pattern in slot.patterns]
            device = self.A[0].device
            longest = max(len(pattern) for pattern, _ in items)
            tokens = torch.tensor([p + [-1] * (longest - len(p)) for p, _ in items], dtype=torch.long, device=device)
            lengths = torch.tensor([len(p) for p, _ in items], dtype=torch.long, device=device)
            hashes = prefix_hashes(tokens).gather(1, (lengths - 1)[:, None])[:, 0]
            order = hashes.argsort()
            owners = torch.tensor([index for _, index in items], dtype=torch.long, device=device)
            self._table = _PatternTable(hashes[order], tokens[order], lengths[order], owners[order],
                                        bool((hashes[order][1:] == hashes[order][:-1]).any()))
        return self._table

    def mentions(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every subject mention in ``ids`` [B, T]: (row, position of its last token, slot).

        The hash of the window of every length starting at every position, one tensor op per pattern length;
        one sorted search of all of them in the table; then a token-by-token check of each hit."""
        table = self._pattern_table()
        longest = table.tokens.shape[1]
        windows = torch.nn.functional.pad(ids, (0, longest), value=-1).unfold(1, longest, 1)[:, : ids.shape[1]]
        # windows that run past the end hash their -1 padding: never an exact match
        found = prefix_hashes(windows).movedim(-1, 0).contiguous()  # [length - 1, B, T]
        places = [torch.searchsorted(table.hashes, found).clamp_max(len(table.hashes) - 1)]
        if table.duplicates:  # both ends of a run of equal hashes: a collision cannot hide a match
            places.append((torch.searchsorted(table.hashes, found, side="right") - 1).clamp_min(0))
        rows, ends, slots = [], [], []
        for place in places:
            length, row, start = (table.hashes[place] == found).nonzero(as_tuple=True)
            candidate = place[length, row, start]
            pattern_length = table.lengths[candidate]
            beyond = torch.arange(longest, device=ids.device) >= pattern_length[:, None]
            exact = (pattern_length == length + 1) & ((windows[row, start] == table.tokens[candidate]) | beyond).all(-1)
            rows.append(row[exact])
            ends.append(start[exact] + length[exact])
            slots.append(table.owners[candidate[exact]])
        return torch.cat(rows), torch.cat(ends), torch.cat(slots)

    def first_opening(self, ids: torch.Tensor, index: int) -> torch.Tensor:
        """Per row of ``ids`` [B, T], the first position where slot ``index`` opens (the last token of the first
        mention of its subject), or T where it never does: the slot changes nothing before it."""
        row, end, slot = self.mentions(ids)
        mine = slot == index
        first = torch.full((len(ids),), ids.shape[1], dtype=torch.long, device=ids.device)
        return first.scatter_reduce(0, row[mine], end[mine], "amin")

    def gate_state(self) -> tuple:
        """The gates of the sequences in progress, to continue them more than once (:meth:`restore_gate`)."""
        return self._open, self._tail

    def restore_gate(self, state: tuple) -> None:
        self._open, self._tail = state

    def _gate_hook(self, model, args, kwargs):
        """Before every forward pass of the model: which slots are open in which rows, over which positions."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not self.slots:
            self._open = None
            return
        if self.A[0].device != ids.device:  # the model was moved after the memory was made
            self.A, self.B = [a.to(ids.device) for a in self.A], [b.to(ids.device) for b in self.B]
            self._table = self._ends_table = None
        past = self._past_length(kwargs)
        continuing = past > 0 and self._open is not None and self._tail is not None and len(self._tail) == len(ids)
        context, offset = (torch.cat([self._tail, ids], 1), past - self._tail.shape[1]) if continuing else (ids, past)
        row, end, slot = self.mentions(context)
        end = end + offset
        close = self._closes(context, offset, row, end)
        if continuing:  # earlier gates stay, and one still open closes at this step's first sentence end
            earlier = self._open
            still_open = earlier.closes == NEVER
            earlier_close = torch.where(still_open, self._closes(context, offset, earlier.rows, earlier.starts),
                                        earlier.closes)
            row, slot = torch.cat([earlier.rows, row]), torch.cat([earlier.slots, slot])
            end, close = torch.cat([earlier.starts, end]), torch.cat([earlier_close, close])
            live = close > past  # gates closed before this step are done
            row, slot, end, close = row[live], slot[live], end[live], close[live]
        else:
            self.sequences_seen += len(ids)
            self.sequences_gated += len(torch.unique(row))
        if len(row):  # one gate per (row, slot, sentence), open from the sentence's first mention
            unique, inverse = torch.unique(torch.stack([row, slot, close], 1), dim=0, return_inverse=True)
            first = torch.full((len(unique),), NEVER, dtype=torch.long, device=ids.device)
            end = first.scatter_reduce(0, inverse, end, "amin")
            row, slot, close = unique.unbind(1)
        self._open = _OpenSlots(row, slot, end, close, past)
        longest = self._pattern_table().tokens.shape[1]
        self._tail = context[:, max(0, context.shape[1] - (longest - 1)):] if longest > 1 else ids[:, :0]

    def _closes(self, context: torch.Tensor, offset: int, rows: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """For gates opened at absolute ``starts`` in ``rows``: the absolute position of the first sentence-ending
        token after the start in ``context`` (whose first token is at ``offset``), else NEVER."""
        if self._ends_table is None:
            table = torch.zeros(max(self.sentence_ends, default=-1) + 1, dtype=torch.bool, device=context.device)
            table[self.sentence_ends] = True
            self._ends_table = table
        table = self._ends_table
        ends = table[context.clamp(0, len(table) - 1)] & (context < len(table)) if len(table) else torch.zeros_like(
            context, dtype=torch.bool)
        positions = offset + torch.arange(context.shape[1], device=context.device)
        after = ends[rows] & (positions[None, :] > starts[:, None])  # [gates, T]
        found = after.any(1)
        return torch.where(found, positions[after.to(torch.uint8).argmax(1)], torch.full_like(starts, NEVER))

    @staticmethod
    def _past_length(kwargs) -> int:
        position = kwargs.get("cache_position")
        if position is not None and position.numel():
            return int(position[0])
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 names it "cache"
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        return 0

    def _change_hook(self, module_index: int):
        def hook(module, args, output):
            opened = self._open
            if opened is None or not len(opened.rows):
                return output
            x = args[0]
            slots = opened.slots
            a, b = self.A[module_index][slots], self.B[module_index][slots]  # [M, in, r], [M, r, out]
            if self._training is not None:
                index, trained_a, trained_b = self._training
                training = (slots == index)[:, None, None]
                a = torch.where(training, trained_a[module_index], a)
                b = torch.where(training, trained_b[module_index], b)
            if self._muted is not None:
                b = b * (slots != self._muted)[:, None, None]
            change = torch.bmm(torch.bmm(x[opened.rows].float(), a), b) * opened.spans(x.shape[1])[..., None]
            return output.index_add(0, opened.rows, change.to(output.dtype))

        return hook

    # --- reporting and persistence -------------------------------------------------------------
    def stats(self) -> dict:
        """Slots, facts, bytes (float32 A and B of the slots in use) per slot and per fact, gate firing rate."""
        per_slot = 4 * sum(d_in * self.rank + self.rank * d_out for d_in, d_out in self.dims)
        facts = sum(len(s.facts) for s in self.slots)
        return {
            "slots": len(self.slots), "facts": facts, "rank": self.rank, "modules": list(self.modules),
            "bytes": per_slot * len(self.slots), "bytes_per_edit": per_slot * len(self.slots) / facts if facts else None,
            "sequences_seen": self.sequences_seen,
            "gate_rate": self.sequences_gated / self.sequences_seen if self.sequences_seen else None,
        }

    def reset_counters(self) -> None:
        """Start counting gate firings afresh (e.g. for the final evaluation only)."""
        self.sequences_seen = self.sequences_gated = 0

    def save(self, directory: str | Path) -> None:
        """Write the memory into ``directory`` as one safetensors file (the slots' index in its metadata),
        replaced atomically."""
        count = len(self.slots)
        tensors = {f"A.{i}": a[:count].contiguous().cpu() for i, a in enumerate(self.A)}
        tensors |= {f"B.{i}": b[:count].contiguous().cpu() for i, b in enumerate(self.B)}
        index = {"format": 2, "modules": list(self.modules), "rank": self.rank, "sentence_ends": self.sentence_ends,
                 "slots": [{"subject": s.subject, "patterns": s.patterns, "facts": [asdict(f) for f in s.facts]}
                           for s in self.slots]}
        path = Path(directory) / MEMORY_FILE
        save_file(tensors, path.with_suffix(".tmp"), metadata={"index": json.dumps(index)})
        os.replace(path.with_suffix(".tmp"), path)

    @classmethod
    def load(cls, model: torch.nn.Module, directory: str | Path) -> "EditMemory | None":
        """Attach the memory saved in ``directory`` to ``model``; None if the directory has none."""
        path = Path(directory) / MEMORY_FILE
        if not path.exists():
            return None
        with safe_open(path, "pt") as handle:
            index = json.loads(handle.metadata()["index"])
        tensors = load_file(path)
        memory = cls.attach(model, tuple(index["modules"]), index["rank"], index.get("sentence_ends", ()))
        device = memory.A[0].device
        memory.A = [tensors[f"A.{i}"].to(device) for i in range(len(memory.layers))]
        memory.B = [tensors[f"B.{i}"].to(device) for i in range(len(memory.layers))]
        for entry in index["slots"]:
            memory.slots.append(Slot(entry["subject"], entry["patterns"], [Fact(**f) for f in entry["facts"]]))
            memory._slot_of[entry["subject"]] = len(memory.slots) - 1
        return memory
