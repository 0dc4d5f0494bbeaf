"""Batched probing and evaluation of edit requests against a model."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdpo.metrics import agreement, answer_predictions, exact_match, mean, ngram_entropy, token_accuracy
from kdpo.modeling import answer_token_ids, chunks, encode_pairs, load_model
from kdpo.requests import EditRequest

LOGITS_BUDGET_BYTES = 256 * 2**20  # the most logits (as float32) one scoring forward pass may hold
PROTOCOL = {
    "edit_success": "teacher-forced token accuracy of target_new on the edit prompt (EasyEdit)",
    "generalization": "teacher-forced token accuracy of target_new on the rephrase prompts (EasyEdit)",
    "locality": "share of teacher-forced argmax tokens on locality prompts unchanged from the pre-edit model (EasyEdit)",
    "portability": "teacher-forced token accuracy of the portability answers (EasyEdit)",
    "fluency": "weighted 2/3-gram entropy of a greedy generation from the edit prompt (EasyEdit weights 2/3, 4/3)",
    "edit_success_exact": "greedy generation from the edit prompt, as many tokens as target_new has, equal to "
                          "target_new's tokens: 1 or 0 (teacher forcing overstates edits, arXiv 2502.11177)",
    "generalization_exact": "edit_success_exact on each rephrase prompt, averaged per request",
    "locality_exact": "share of locality prompts whose greedy generation (as many tokens as the ground truth) "
                      "is the pre-edit model's, token for token",
    "retention": "edit success of every edit but the last, measured after the last edit",
}
EXACT = ("edit_success_exact", "generalization_exact", "locality_exact")  # the generation-based metrics


@dataclass
class RequestScores:
    """Metrics of one edit request; None where the request has no probe of that kind."""

    edit_success: float
    generalization: float | None = None
    locality: float | None = None
    portability: float | None = None
    fluency: float | None = None
    edit_success_exact: float | None = None
    generalization_exact: float | None = None
    locality_exact: float | None = None


@dataclass
class Probe:
    """What a model knows about a list of requests: scores, locality fingerprints, its answers, and its
    greedy token ids on the locality prompts (None in probes made before they were recorded)."""

    scores: list[RequestScores]
    locality_predictions: list[list[list[int]]]
    answers: list[str]
    locality_generations: list[list[list[int]]] | None = None

    def to_dict(self) -> dict:
        return {
            "scores": [asdict(s) for s in self.scores],
            "locality_predictions": self.locality_predictions,
            "answers": self.answers,
            "locality_generations": self.locality_generations,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Probe":
        return cls([RequestScores(**s) for s in data["scores"]], data["locality_predictions"], data["answers"],
                   data.get("locality_generations"))


@torch.no_grad()
def score_pairs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> tuple[list[float], list[list[int]]]:
    """Teacher-forced token accuracy and argmax answer tokens of each (prompt, answer) pair.

    Batches of ``batch_size`` pairs are split so that one forward pass holds at most ``LOGITS_BUDGET_BYTES``
    of logits: with a real vocabulary (150k tokens) the logits, not the model, would set the memory peak."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    accuracies: list[float] = []
    predictions: list[list[int]] = []
    for batch_pairs in chunks(pairs, batch_size):
        batch = encode_pairs(tokenizer, batch_pairs, device)
        rows = max(1, LOGITS_BUDGET_BYTES // (4 * vocab * batch.input_ids.shape[1]))
        for part in chunks(range(len(batch_pairs)), rows):
            rows_slice = slice(part[0], part[-1] + 1)
            logits = model(input_ids=batch.input_ids[rows_slice], attention_mask=batch.attention_mask[rows_slice]).logits
            labels = batch.labels[rows_slice]
            accuracies += token_accuracy(logits, labels).tolist()  # argmax: the model's own dtype will do
            predictions += answer_predictions(logits, labels)
    return accuracies, predictions


@torch.no_grad()
def greedy_token_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], lengths: list[int],
    batch_size: int = 64,
) -> list[list[int]]:
    """The first ``lengths[i]`` greedy token ids after ``prompts[i]`` (left-padded batches, KV cache).

    A batch decodes its longest length and each row keeps its own: greedy decoding's first tokens do not
    depend on how many follow. A row that ended early is filled with pad ids, as ``generate`` fills it."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    rows: list[list[int]] = []
    try:
        for batch_prompts, batch_lengths in zip(chunks(prompts, batch_size), chunks(lengths, batch_size)):
            encoded = tokenizer(batch_prompts, return_tensors="pt", padding=True).to(device)
            generated = model.generate(
                **encoded, max_new_tokens=max(batch_lengths), do_sample=False, use_cache=True, pad_token_id=pad
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :].tolist()
            rows += [(row + [pad] * length)[:length] for row, length in zip(new_tokens, batch_lengths)]
    finally:
        tokenizer.padding_side = side
    return rows


def greedy_generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), without the prompt."""
    rows = greedy_token_ids(model, tokenizer, prompts, [max_new_tokens] * len(prompts), batch_size)
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def _flatten(requests: list[EditRequest]) -> tuple[list[tuple[str, str]], list[tuple[int, str]]]:
    """All (prompt, answer) pairs of the requests, with (request index, kind) for regrouping."""
    pairs, owners = [], []
    for index, request in enumerate(requests):
        items = [("edit_success", request.prompt, request.target_new)]
        items += [("generalization", prompt, request.target_new) for prompt in request.rephrase_prompts]
        items += [("locality", item.prompt, item.ground_truth) for item in request.locality]
        items += [("portability", item.prompt, item.ground_truth) for item in request.portability]
        for kind, prompt, answer in items:
            pairs.append((prompt, answer))
            owners.append((index, kind))
    return pairs, owners


def _score_requests(model, tokenizer, requests, batch_size):
    pairs, owners = _flatten(requests)
    accuracies, predictions = score_pairs(model, tokenizer, pairs, batch_size)
    grouped = [{"edit_success": [], "generalization": [], "locality": [], "portability": []} for _ in requests]
    for (index, kind), accuracy, prediction in zip(owners, accuracies, predictions):
        grouped[index][kind].append(prediction if kind == "locality" else accuracy)
    return grouped


def _greedy_answers(model, tokenizer, requests, batch_size):
    """Per request and kind: the greedy token ids from each edit, rephrase and locality prompt, as many as
    that prompt's answer has."""
    pairs, owners = _flatten(requests)
    kept = [i for i, (_, kind) in enumerate(owners) if kind != "portability"]
    lengths = [len(answer_token_ids(tokenizer, pairs[i][1])) for i in kept]
    generated = greedy_token_ids(model, tokenizer, [pairs[i][0] for i in kept], lengths, batch_size)
    grouped = [{"edit_success": [], "generalization": [], "locality": []} for _ in requests]
    for i, ids in zip(kept, generated):
        index, kind = owners[i]
        grouped[index][kind].append(ids)
    return grouped


def _exact_scores(tokenizer, request, tokens, locality_before) -> dict[str, float | None]:
    """A request's ``_exact`` metrics from its greedy token ids (``tokens``: one entry of ``_greedy_answers``);
    locality_exact against the pre-edit model's locality tokens, None where those are None."""
    target = answer_token_ids(tokenizer, request.target_new)
    locality = None if locality_before is None else mean(
        exact_match(after, before) for after, before in zip(tokens["locality"], locality_before, strict=True))
    return {
        "edit_success_exact": exact_match(tokens["edit_success"][0], target),
        "generalization_exact": mean(exact_match(ids, target) for ids in tokens["generalization"]),
        "locality_exact": locality,
    }


def _generations(model, tokenizer, requests, fluency_tokens: int, batch_size: int):
    """Greedy generations from the edit prompts and their fluency; empty and None when fluency_tokens is 0."""
    if fluency_tokens <= 0:
        return [""] * len(requests), [None] * len(requests)
    generations = greedy_generate(model, tokenizer, [r.prompt for r in requests], fluency_tokens, batch_size)
    return generations, [ngram_entropy(text) for text in generations]


def probe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    fluency_tokens: int = 24,
    batch_size: int = 64,
) -> Probe:
    """The pre-edit baseline: scores, locality fingerprints (teacher-forced argmax and greedy tokens), greedy
    answers and fluency."""
    grouped = _score_requests(model, tokenizer, requests, batch_size)
    greedy = _greedy_answers(model, tokenizer, requests, batch_size)
    generations, fluencies = _generations(model, tokenizer, requests, fluency_tokens, batch_size)
    scores = [
        RequestScores(
            edit_success=g["edit_success"][0],
            generalization=mean(g["generalization"]),
            locality=1.0 if g["locality"] else None,
            portability=mean(g["portability"]),
            fluency=fluency,
            **_exact_scores(tokenizer, request, tokens, tokens["locality"]),  # locality_exact: 1.0 by definition
        )
        for request, g, tokens, fluency in zip(requests, grouped, greedy, fluencies)
    ]
    return Probe(scores, [g["locality"] for g in grouped], generations, [t["locality"] for t in greedy])


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    baseline_locality: list[list[list[int]]],
    fluency_tokens: int = 24,
    batch_size: int = 64,
    baseline_generations: list[list[list[int]]] | None = None,
) -> list[RequestScores]:
    """Score every request now; locality against the pre-edit fingerprints, locality_exact against the pre-edit
    greedy tokens (``Probe.locality_generations``; None: not measured); fluency if fluency_tokens > 0."""
    return evaluate_with_answers(
        model, tokenizer, requests, baseline_locality, fluency_tokens, batch_size, baseline_generations
    )[0]


def evaluate_with_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    baseline_locality: list[list[list[int]]],
    fluency_tokens: int = 24,
    batch_size: int = 64,
    baseline_generations: list[list[list[int]]] | None = None,
) -> tuple[list[RequestScores], list[str]]:
    """``evaluate``, plus the greedy generations from the edit prompts that fluency was measured on."""
    grouped = _score_requests(model, tokenizer, requests, batch_size)
    greedy = _greedy_answers(model, tokenizer, requests, batch_size)
    generations, fluencies = _generations(model, tokenizer, requests, fluency_tokens, batch_size)
    tokens_before = baseline_generations or [None] * len(requests)
    scores = []
    for request, g, tokens, before, locality_tokens_before, fluency in zip(
        requests, grouped, greedy, baseline_locality, tokens_before, fluencies
    ):
        locality = [agreement(b, a) for b, a in zip(before, g["locality"])]
        scores.append(RequestScores(
            g["edit_success"][0], mean(g["generalization"]), mean(locality), mean(g["portability"]), fluency,
            **_exact_scores(tokenizer, request, tokens, locality_tokens_before),
        ))
    return scores, generations


def first_sentence(text: str) -> str:
    """The answer part of a greedy generation: up to the first period or line break."""
    return text.split("\n")[0].split(".")[0].strip()


def summarize(scores: list[RequestScores]) -> dict[str, float | None]:
    """Mean of each metric over the requests that have it."""
    return {name: mean(getattr(s, name) for s in scores) for name in RequestScores.__dataclass_fields__}


def compare_to_baseline(
    model_path: str, baseline_path: str, requests: list[EditRequest], device: str = "cpu", dtype: str = "float32"
) -> dict[str, dict]:
    """Mean metrics of the model before editing (``baseline_path``) and after (``model_path``); the
    locality of the edited model is measured against the baseline's predictions. One model in memory at a time."""
    base_model, base_tokenizer = load_model(baseline_path, device, dtype)
    baseline = probe(base_model, base_tokenizer, requests)
    del base_model
    model, tokenizer = load_model(model_path, device, dtype)
    after = evaluate(model, tokenizer, requests, baseline.locality_predictions,
                     baseline_generations=baseline.locality_generations)
    return {"before": summarize(baseline.scores), "after": summarize(after)}
