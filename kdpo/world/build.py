"""The knowledge world: a small causal LM pre-trained by the project on a fact table, so it really knows
facts that can then be edited. The result is a normal Hugging Face model directory.

Two sources of facts:
- the shipped table (``data/facts.csv`` with ``data/relations.json`` templates): every fact is written
  with each of its relation's templates; for the facts in the edit pool the last template is held out
  of training, so generalization after an edit is measured on a paraphrase the model never saw. With
  ``people`` > 0 the table grows by that many generated people (``data/people.json``: invented names, one
  fact per person relation, answers drawn from the table's), which the ``large`` preset uses for 10,000+
  edit requests;
- any edit-request file (``--from``): its prompts, rephrases and locality prompts with their *true*
  answers become the facts, and the file's requests become the world's edits.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdpo.config import ConfigError, build_settings
from kdpo.evaluation import score_pairs
from kdpo.loaders import EditDataError, load_requests, write_jsonl
from kdpo.requests import EditRequest, PromptAnswer

DATA = Path(__file__).parent / "data"
WORLD_FORMAT = 2  # bump when the build changes what a world directory holds
FILE_WORLD_FORMAT = 3  # the same, for worlds built from an edit file (3: they learn the names edits target)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass
class WorldConfig:
    """How a world is built. Every field is part of the cache key."""

    seed: int = 0
    max_facts: int = 1700  # learn a seeded sample of this many facts of the table (0: all)
    people: int = 0  # generated people added to the table, each with a fact per relation of data/people.json
    hidden_size: int = 128
    intermediate_size: int = 1024
    layers: int = 4
    heads: int = 4
    max_epochs: int = 60  # a cap: training stops at the first check (every check_every epochs) that meets recall_target
    check_every: int = 3
    lr: float = 5e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    recall_target: float = 0.99
    edit_pool_fraction: float = 0.6
    neighbours: int = 2
    facts_per_sequence: int = 3
    text_weight: float = 0.2


# Named settings for ``WorldConfig``. ``large``: every table fact plus 1,770 generated people (12,631 facts);
# 80% of them are edit requests (10,104), the rest locality probes.
WORLD_PRESETS: dict[str, dict] = {"large": {"max_facts": 0, "people": 1770, "edit_pool_fraction": 0.8}}
ADDED_SETTINGS = {"people": 0}  # settings newer than WORLD_FORMAT 2: in a world's key only where they differ


def world_config(settings: dict) -> WorldConfig:
    """A ``WorldConfig`` from KEY=VALUE settings (CLI strings are parsed); ``preset`` names a ``WORLD_PRESETS``
    entry whose values the other settings override."""
    settings = dict(settings)
    preset = settings.pop("preset", None)
    if preset is not None and preset not in WORLD_PRESETS:
        raise ConfigError(f"world: unknown preset {preset!r}; choose from {', '.join(WORLD_PRESETS)}")
    return build_settings(WorldConfig, WORLD_PRESETS.get(preset, {}) | settings, "world")


@dataclass(frozen=True)
class TrainingFact:
    """A (prompt, answer) the world learns; ``kind`` is main, paraphrase, locality or name (a bare name, no
    prompt: learned as text, not recalled as a fact)."""

    prompt: str
    answer: str
    kind: str


@dataclass
class World:
    """A built world on disk: the model directory, its training corpus and its default edits."""

    path: Path
    info: dict

    @property
    def edits_path(self) -> Path:
        return self.path / "edits.jsonl"

    def corpus(self) -> list[str]:
        return model_corpus(self.path) or []


def model_corpus(model_dir: str | Path) -> list[str] | None:
    """The training corpus a world (or a model edited from one) carries in ``corpus.txt``; None if absent."""
    path = Path(model_dir) / "corpus.txt"
    return path.read_text().splitlines() if path.exists() else None


def recall_shortfall(model_dir: str | Path) -> str | None:
    """Why the world in ``model_dir`` is weak (its build missed its recall bar), or None: the model is a world
    that met it, or no world (an edited or outside model carries no ``world.json``)."""
    path = Path(model_dir) / "world.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    if info.get("recall_met", True):
        return None
    trained = ", ".join(f"{kind} {value:.3f}" for kind, value in info["recall"].items() if not kind.startswith("held_out"))
    return (f"world {info.get('key', model_dir)} missed its recall bar {info['config']['recall_target']} after "
            f"{info['epochs']} epochs ({trained})")


def cache_root() -> Path:
    """Where built worlds live: ``$KDPO_HOME/worlds`` (default ``~/.cache/kdpo/worlds``)."""
    return Path(os.environ.get("KDPO_HOME", Path.home() / ".cache" / "kdpo")) / "worlds"


# --- fact sources ------------------------------------------------------------------------------


def generated_people(count: int, seed: int, table: list[tuple[str, str, str]], spec_json: Path = DATA / "people.json"):
    """``count`` invented people (names from the spec's syllables, none a table subject) with one fact per
    relation of ``spec_json``, each answer a seeded choice among the ``table`` answers the relation names;
    returns the (subject, relation, answer) rows and the relations (templates) they use."""
    spec = json.loads(spec_json.read_text())
    rng = random.Random(f"people-{seed}")
    taken = {subject for subject, _, _ in table}
    names: dict[str, None] = {}
    while len(names) < count:
        given = "".join(rng.choice(spec["given_syllables"]) for _ in range(2)).capitalize()
        family = "".join(rng.choice(spec["family_syllables"]) for _ in range(2)).capitalize()
        if f"{given} {family}" not in taken:
            names[f"{given} {family}"] = None
    answers = {}
    for relation, source in ((r, s["answers"]) for r, s in spec["relations"].items()):
        column = 0 if source["field"] == "subject" else 2
        answers[relation] = sorted({row[column] for row in table if row[1] == source["relation"]})
    rows = [(name, relation, rng.choice(answers[relation])) for name in names for relation in spec["relations"]]
    return rows, spec["relations"]


def table_facts(config: WorldConfig, facts_csv: Path = DATA / "facts.csv", relations_json: Path = DATA / "relations.json"):
    """Training facts, held-out paraphrases and counterfactual edit requests from the shipped table (and
    ``config.people`` generated people)."""
    relations = json.loads(relations_json.read_text())
    with open(facts_csv, newline="") as handle:
        rows = [(r["subject"], r["relation"], r["answer"]) for r in csv.DictReader(handle)]
    rng = random.Random(config.seed)
    if config.people:
        people, person_relations = generated_people(config.people, config.seed, rows)
        relations |= person_relations
    if config.max_facts:
        rows = rng.sample(rows, min(config.max_facts, len(rows)))
    if config.people:
        rows += people
    order = list(range(len(rows)))
    rng.shuffle(order)
    pool = set(order[: int(len(rows) * config.edit_pool_fraction)])

    training, held_out = [], []
    for index, (subject, relation, answer) in enumerate(rows):
        templates = relations[relation]["templates"]
        for position, template in enumerate(templates):
            kind = "main" if position == 0 else "paraphrase"
            fact = TrainingFact(template.format(subject), answer, kind)
            (held_out if index in pool and position == len(templates) - 1 else training).append(fact)

    answers_of: dict[str, list[str]] = {}  # counterfactual targets: other answers the world has learned
    for _, relation, answer in rows:
        answers_of.setdefault(relation, [])
        if answer not in answers_of[relation]:
            answers_of[relation].append(answer)
    probes = [i for i in range(len(rows)) if i not in pool]  # locality probes are never edited
    edits = []
    for index in order[: len(pool)]:
        subject, relation, answer = rows[index]
        alternatives = [a for a in answers_of[relation] if a != answer]
        if not alternatives:
            continue
        templates = relations[relation]["templates"]
        same_relation = [i for i in probes if rows[i][1] == relation and rows[i][0] != subject]
        same_relation.sort(key=lambda i: (rows[i][2] != answer, rng.random()))  # CounterFact-style neighbours
        same_subject = [i for i in probes if rows[i][0] == subject and rows[i][1] != relation]
        neighbours = same_relation[: config.neighbours] + same_subject[:1]
        edits.append(
            EditRequest(
                case_id=f"{relation}:{subject}",
                subject=subject,
                prompt=templates[0].format(subject),
                target_new=rng.choice(alternatives),
                ground_truth=answer,
                rephrase_prompts=tuple(t.format(subject) for t in templates[1:]),
                locality=tuple(
                    PromptAnswer(relations[rows[i][1]]["templates"][0].format(rows[i][0]), rows[i][2]) for i in neighbours
                ),
            )
        )
    return training, held_out, edits


def request_facts(requests: list[EditRequest], source: str | Path):
    """Training facts from the requests of the edit file ``source``: their prompts with their true answers."""
    requests = [r for r in requests if r.ground_truth]
    if not requests:
        raise EditDataError(source, "no request has a ground_truth, so there is no true fact to learn")
    seen, training = set(), []
    for request in requests:
        items = [TrainingFact(request.prompt, request.ground_truth, "main")]
        items += [TrainingFact(p, request.ground_truth, "paraphrase") for p in request.rephrase_prompts]
        items += [TrainingFact(i.prompt, i.ground_truth, "locality") for i in request.locality]
        for fact in items:
            if fact.prompt not in seen:  # one answer per prompt: the first one wins
                seen.add(fact.prompt)
                training.append(fact)
    # A pre-trained model knows the names an edit asks for ("Harvard University"), even where it never saw
    # them as this fact's answer; without them a multi-token target is a token chain the world never learned.
    learned = {fact.answer for fact in training}
    names = dict.fromkeys(r.target_new for r in requests if r.target_new not in learned)
    return training + [TrainingFact("", name, "name") for name in names], [], requests


# --- building ----------------------------------------------------------------------------------


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the corpus: corpus words become single tokens, and any
    other string still tokenizes (into byte pieces)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=16384, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _recall(model, tokenizer, facts: list[TrainingFact]) -> dict[str, float]:
    """Share of facts whose every answer token is the argmax, per kind."""
    recall = {}
    for kind in sorted({f.kind for f in facts}):
        selected = [(f.prompt, f.answer) for f in facts if f.kind == kind]
        accuracies, _ = score_pairs(model, tokenizer, selected, batch_size=256)
        recall[kind] = sum(a == 1.0 for a in accuracies) / len(accuracies)
    return recall


def _encode_facts(tokenizer, facts: list[TrainingFact], text_weight: float) -> list[tuple[list[int], list[float]]]:
    """Each fact as ``prompt answer.`` tokens with a loss weight per token: 1 on the answer tokens (and the
    closing period), ``text_weight`` on the prompt's, so memorising facts is not drowned by the
    unpredictable subject tokens while the model still learns the text around them."""
    prompts = tokenizer([f.prompt for f in facts], add_special_tokens=False)["input_ids"]
    answers = tokenizer([f" {f.answer}." for f in facts], add_special_tokens=False)["input_ids"]
    return [(p + a, [text_weight] * len(p) + [1.0] * len(a)) for p, a in zip(prompts, answers)]


def _pack(encoded, per_sequence: int, tokenizer, generator: torch.Generator):
    """Shuffle the facts and pack them ``per_sequence`` at a time into ``<s> fact. fact. fact.</s>``, so the
    model sees each fact at the start of a text and amid others, and its greedy continuations are text
    (several facts), which makes the n-gram-entropy fluency metric meaningful."""
    order = torch.randperm(len(encoded), generator=generator).tolist()
    packed = []
    for start in range(0, len(order), per_sequence):
        ids, weights = [tokenizer.bos_token_id], [0.0]
        for index in order[start : start + per_sequence]:
            ids += encoded[index][0]
            weights += encoded[index][1]
        packed.append((ids + [tokenizer.eos_token_id], weights + [1.0]))
    return packed


def _batch_loss(model, batch, pad_id: int) -> torch.Tensor:
    """Weighted next-token cross-entropy of a list of (ids, weights) sequences."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch])
    weights = torch.tensor([w + [0.0] * (width - len(w)) for _, w in batch])
    attention = (torch.arange(width)[None, :] < torch.tensor([len(ids) for ids, _ in batch])[:, None]).long()
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return (losses * weights[:, 1:]).sum() / weights[:, 1:].sum()


def train_world(
    training: list[TrainingFact], held_out: list[TrainingFact], config: WorldConfig, progress: bool = True
):
    """Pre-train a Llama-shaped model from random init on the training facts until recall is reached."""
    torch.manual_seed(config.seed)
    texts = [f"{f.prompt} {f.answer}" for f in training]
    tokenizer = build_tokenizer(texts)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(model_config)
    encoded = _encode_facts(tokenizer, training, config.text_weight)
    generator = torch.Generator().manual_seed(config.seed)
    sequences_per_epoch = -(-len(encoded) // config.facts_per_sequence)
    batch_size = min(config.batch_size, max(8, sequences_per_epoch // 40))  # small worlds: >= 40 steps an epoch
    total_steps = config.max_epochs * -(-sequences_per_epoch // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, total_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 10%
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(step / total_steps, 1.0)))
    )
    checks, recall = [], {}
    recalled = [f for f in training if f.kind != "name"]  # names are learned as text, not recalled as facts
    bar = tqdm(range(1, config.max_epochs + 1), desc="pre-training the world", disable=not progress, unit="epoch")
    for epoch in bar:
        model.train()
        sequences = _pack(encoded, config.facts_per_sequence, tokenizer, generator)
        for batch_index in torch.randperm(len(sequences), generator=generator).split(batch_size):
            loss = _batch_loss(model, [sequences[i] for i in batch_index.tolist()], tokenizer.pad_token_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if epoch % config.check_every == 0 or epoch == config.max_epochs:
            model.eval()
            checked = random.Random(epoch).sample(recalled, min(len(recalled), 512))
            recall = _recall(model, tokenizer, checked)  # a cheap look first: a full check costs about an epoch
            if min(recall.values()) >= config.recall_target or epoch == config.max_epochs:
                checked = recalled
                recall = _recall(model, tokenizer, recalled)
            checks.append({"epoch": epoch, "loss": round(loss.item(), 4), "facts_checked": len(checked), **recall})
            if min(recall.values()) >= config.recall_target:
                break
    model.eval()
    met = min(recall.values()) >= config.recall_target  # the rule that ends training, on the trained kinds
    if held_out:
        recall |= {f"held_out_{kind}": value for kind, value in _recall(model, tokenizer, held_out).items()}
    if not met:
        warnings.warn(f"the world did not reach recall {config.recall_target} in {epoch} epochs: {recall}; "
                      "raise max_epochs or lr (--set) before editing it")
    return model, tokenizer, {"epochs": epoch, "recall": recall, "recall_met": met, "batch_size": batch_size,
                              "checks": checks}


def corpus_lines(training: list[TrainingFact], config: WorldConfig) -> list[str]:
    """The world's text as it was trained: every fact once, ``facts_per_sequence`` to a line, in a seeded
    order, each closed by a period. Protection's key statistics come from these lines, so they cover the
    positions between facts (what the model generates after an answer), not only isolated prompts."""
    order = list(range(len(training)))
    random.Random(config.seed).shuffle(order)
    facts = [f"{training[i].prompt} {training[i].answer}.".lstrip() for i in order]
    step = config.facts_per_sequence
    return [" ".join(facts[start : start + step]) for start in range(0, len(facts), step)]


def table_sources(config: WorldConfig) -> list[Path]:
    """The shipped files a table world is built from."""
    return [DATA / "facts.csv", DATA / "relations.json", *([DATA / "people.json"] if config.people else [])]


def world_key(source_files: list[Path], config: WorldConfig, build_format: int = WORLD_FORMAT) -> str:
    """Cache key: the content of the fact sources, the build settings and the build format (a setting of
    ``ADDED_SETTINGS`` only where it differs from its default, so worlds built before it keep their key)."""
    settings = {k: v for k, v in asdict(config).items() if ADDED_SETTINGS.get(k, object()) != v}
    digest = hashlib.sha256(json.dumps({"format": build_format, "config": settings}, sort_keys=True).encode())
    for path in source_files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def build_world(
    config: WorldConfig | None = None, from_file: str | Path | None = None, out: str | Path | None = None,
    force: bool = False, progress: bool = True, skip_invalid: bool = False,
) -> World:
    """Build (or reuse from the cache) a world; returns it with its metadata (recall, timings).

    ``from_file`` is read whole first, cached or not: an invalid record raises :class:`EditDataError`
    naming the file, record and field, or with ``skip_invalid`` is left out and listed in the
    world's ``info["skipped"]`` (each a :class:`~kdpo.requests.SkippedRecord` as a dict).
    """
    config = config or WorldConfig()
    loaded = load_requests(from_file, skip_invalid=skip_invalid) if from_file else None
    skipped = {"skipped": [asdict(record) for record in loaded.skipped]} if loaded else {}
    sources = [Path(from_file)] if from_file else table_sources(config)
    key = world_key(sources, config, FILE_WORLD_FORMAT if from_file else WORLD_FORMAT)
    target = Path(out) if out else cache_root() / key
    info_path = target / "world.json"
    if not force and info_path.exists() and json.loads(info_path.read_text()).get("key") == key:
        return World(target, json.loads(info_path.read_text()) | skipped | {"cached": True})

    started = time.perf_counter()
    training, held_out, edits = request_facts(loaded.requests, from_file) if loaded else table_facts(config)
    model, tokenizer, report = train_world(training, held_out, config, progress)
    info = {
        "key": key,
        "source": str(from_file) if from_file else "kdpo/world/data (shipped fact table"
                  + (f" + {config.people} generated people)" if config.people else ")"),
        "config": asdict(config),
        "facts": {kind: sum(f.kind == kind for f in training) for kind in ("main", "paraphrase", "locality", "name")},
        "held_out_paraphrases": len(held_out),
        "edits": len(edits),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        **report,
        **skipped,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "corpus.txt").write_text("\n".join(corpus_lines(training, config)) + "\n")
    write_jsonl(edits, staging / "edits.jsonl")
    (staging / "world.json").write_text(json.dumps(info, indent=2))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)  # a half-written world is never visible under its key
    return World(target, info | {"cached": False})


def default_world(progress: bool = True) -> World:
    """The world built from the shipped fact table with default settings (cached)."""
    return build_world(progress=progress)
