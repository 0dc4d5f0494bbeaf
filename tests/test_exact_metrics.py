"""The generation-based ``_exact`` metrics: greedy decoding of the answer's length, exact token match."""
import json
from dataclasses import replace

import pytest
import torch

from kdpo.editing import make_config, run_sequential
from kdpo.evaluation import EXACT, Probe, evaluate, greedy_token_ids, probe
from kdpo.metrics import exact_match
from kdpo.modeling import answer_token_ids, load_model


@torch.no_grad()
def argmax_continuation(model, tokenizer, prompt: str, length: int) -> list[int]:
    """Greedy decoding by hand, one prompt, no cache: ``length`` tokens, pad ids after end-of-sequence."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    tokens = []
    while len(tokens) < length and (not tokens or tokens[-1] != tokenizer.eos_token_id):
        tokens.append(int(model(input_ids=ids).logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens + [tokenizer.pad_token_id] * (length - len(tokens))


@pytest.fixture
def requests(tiny_requests):
    """Edit requests, and the same ones asking for the answer the model already knows (exact match expected)."""
    chosen = tiny_requests[:4]
    return chosen + [replace(r, case_id=f"{r.case_id}-known", target_new=r.ground_truth) for r in chosen]


def test_exact_match_is_all_or_nothing():
    assert exact_match([5, 6, 7], [5, 6, 7]) == 1.0
    assert exact_match([5, 6, 8], [5, 6, 7]) == 0.0
    assert exact_match([5, 6], [5, 6, 7]) == 0.0


def test_batched_greedy_tokens_match_greedy_decoding_by_hand(tiny_model, requests):
    model, tokenizer = tiny_model
    prompts = [r.prompt for r in requests] + [p for r in requests for p in r.rephrase_prompts]
    lengths = [1 + i % 4 for i in range(len(prompts))]  # rows of one batch want different lengths
    rows = greedy_token_ids(model, tokenizer, prompts, lengths, batch_size=3)
    assert rows == [argmax_continuation(model, tokenizer, p, n) for p, n in zip(prompts, lengths)]


def test_probe_of_unedited_model(tiny_model, requests):
    model, tokenizer = tiny_model
    result = probe(model, tokenizer, requests, fluency_tokens=0)
    for request, scores, locality_tokens in zip(requests, result.scores, result.locality_generations):
        target = answer_token_ids(tokenizer, request.target_new)
        assert scores.edit_success_exact == float(argmax_continuation(model, tokenizer, request.prompt, len(target))
                                                  == target)
        rephrased = [argmax_continuation(model, tokenizer, p, len(target)) == target for p in request.rephrase_prompts]
        assert scores.generalization_exact == (sum(rephrased) / len(rephrased) if rephrased else None)
        assert scores.locality_exact == (1.0 if request.locality else None)
        assert locality_tokens == [argmax_continuation(model, tokenizer, item.prompt,
                                                       len(answer_token_ids(tokenizer, item.ground_truth)))
                                   for item in request.locality]
        # teacher forcing all right <=> greedy decoding yields exactly the answer
        assert scores.edit_success_exact == float(scores.edit_success == 1.0)
    exact = [s.edit_success_exact for s in result.scores]
    assert 0.0 in exact[:4] and 1.0 in exact[4:]  # new targets not known yet, most old answers known
    assert any(s.locality_exact == 1.0 for s in result.scores)


def test_probe_round_trip_and_older_probes(tiny_model, requests):
    model, tokenizer = tiny_model
    result = probe(model, tokenizer, requests[:2], fluency_tokens=0)
    assert Probe.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    older = result.to_dict()
    del older["locality_generations"]
    assert Probe.from_dict(older).locality_generations is None
    again = evaluate(model, tokenizer, requests[:2], result.locality_predictions, fluency_tokens=0)
    assert [s.locality_exact for s in again] == [None, None]


def test_unedited_model_evaluated_one_request_at_a_time_keeps_its_probe(tiny_model, requests):
    """As right after an edit: one request per call, so batches and padding differ from the probe's."""
    model, tokenizer = tiny_model
    baseline = probe(model, tokenizer, requests, fluency_tokens=0)
    for index, request in enumerate(requests):
        (scores,) = evaluate(model, tokenizer, [request], [baseline.locality_predictions[index]], fluency_tokens=0,
                             baseline_generations=[baseline.locality_generations[index]])
        assert scores == baseline.scores[index]


def test_exact_scores_after_edits(tiny_world, tiny_requests):
    model, tokenizer = load_model(tiny_world.path)
    requests = tiny_requests[:2]
    baseline = probe(model, tokenizer, requests, fluency_tokens=0)
    config = make_config("kdpo", overrides={"max_steps": "60"})
    result = run_sequential(model, tokenizer, requests, "kdpo", config, tiny_world.corpus(), progress=False)
    summary = json.loads(json.dumps(result.summary()))  # what ``kdpo edit --json`` prints
    for schedule in ("immediate", "final"):
        assert set(EXACT) <= set(summary[schedule])
        assert 0.0 <= summary[schedule]["edit_success_exact"] <= summary[schedule]["edit_success"] <= 1.0
        assert 0.0 <= summary[schedule]["generalization_exact"] <= 1.0
    for scores in [r.immediate for r in result.records] + result.final:
        assert scores.edit_success_exact == float(scores.edit_success == 1.0)

    after = evaluate(model, tokenizer, requests, baseline.locality_predictions, fluency_tokens=0,
                     baseline_generations=baseline.locality_generations)
    assert [s.edit_success_exact for s in after] == [s.edit_success_exact for s in result.final]
    for request, scores in zip(requests, after):
        assert (scores.locality_exact is None) == (not request.locality)
        assert scores.locality_exact is None or 0.0 <= scores.locality_exact <= 1.0
