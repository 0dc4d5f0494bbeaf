"""Editors on the tiny world: each method changes its target; protection; the sequential driver."""
import pytest
import torch

from conftest import TINY_EDIT
from kdpo.config import ConfigError, flat_settings
from kdpo.editing import SCHEDULE, build_editor, make_config, run_sequential
from kdpo.evaluation import probe, score_pairs
from kdpo.protection import ProtectedSubspace

UNPROTECTED = {"protection": "none", "weights.lr": "1e-3"}


def first_editable(model, tokenizer, requests):
    """The first request whose target the model does not already predict."""
    accuracies, _ = score_pairs(model, tokenizer, [(r.prompt, r.target_new) for r in requests])
    return next(r for r, a in zip(requests, accuracies) if a < 1.0)


@pytest.mark.parametrize("method", ["kdpo", "dpo", "ft-m"])
@pytest.mark.parametrize("protection", ["none", "null-space"])
def test_edit_makes_target_the_argmax(tiny_world, tiny_requests, tiny_model, method, protection):
    model, tokenizer = tiny_model
    request = first_editable(model, tokenizer, tiny_requests)
    settings = {"protection": protection, **TINY_EDIT}
    editor = build_editor(model, tokenizer, method, make_config(method, overrides=settings),
                          tiny_world.corpus())
    outcome = editor.edit(request)
    accuracy, _ = score_pairs(model, tokenizer, [(request.prompt, request.target_new)])
    assert outcome.reached and outcome.steps >= 1 and accuracy == [1.0]
    assert outcome.delta_norm > 0 and len(outcome.losses) == outcome.steps


def test_ft_l_respects_its_norm_constraint(tiny_model, tiny_requests):
    model, tokenizer = tiny_model
    config = make_config("ft-l", overrides={"protection": "none", "norm_constraint": "1e-3", "max_steps": "5"})
    editor = build_editor(model, tokenizer, "ft-l", config)
    before = [m.weight.detach().clone() for m in editor.modules]
    editor.edit(first_editable(model, tokenizer, tiny_requests))
    for module, weight in zip(editor.modules, before):
        change = (module.weight - weight).abs().max().item()
        assert 0 < change <= 1e-3 + 1e-7


def test_kdpo_keeps_no_second_model(tiny_model, tiny_requests):
    model, tokenizer = tiny_model
    editor = build_editor(model, tokenizer, "kdpo", make_config("kdpo", overrides=UNPROTECTED))
    editor.edit(first_editable(model, tokenizer, tiny_requests))
    # the reference is one tensor of log-probs over the positive sequence, not a model copy
    assert isinstance(editor.reference_logprobs, torch.Tensor) and editor.reference_logprobs.dim() == 3
    assert not any(isinstance(v, torch.nn.Module) and v is not model for v in vars(editor).values())


def test_projection_leaves_protected_keys_unchanged():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(40, 8, generator=generator) @ torch.randn(8, 32, generator=generator)  # rank 8 in 32 dims
    subspace = ProtectedSubspace.from_key_covariance(keys.T @ keys, threshold=1e-6)
    assert subspace.rank == 8
    delta = subspace.project(torch.randn(16, 32, generator=generator)).T
    assert torch.allclose(keys @ delta, torch.zeros(40, 16), atol=1e-4)
    new_key = torch.randn(1, 32, generator=generator)
    assert subspace.add_keys(new_key) == 1 and subspace.rank == 9
    assert torch.allclose(subspace.project(new_key), torch.zeros(1, 32), atol=1e-5)


def test_protected_edit_leaves_a_protected_fact_alone(tiny_world, tiny_model, tiny_requests):
    model, tokenizer = tiny_model
    request = first_editable(model, tokenizer, tiny_requests)
    probes = [(item.prompt, item.ground_truth) for r in tiny_requests for item in r.locality]
    _, before = score_pairs(model, tokenizer, probes)
    config = make_config("kdpo", overrides={**TINY_EDIT, "protection": "null-space"})
    editor = build_editor(model, tokenizer, "kdpo", config, tiny_world.corpus())
    assert editor.edit(request).reached
    _, after = score_pairs(model, tokenizer, probes)
    unchanged = sum(b == a for b, a in zip(before, after)) / len(probes)
    assert unchanged >= 0.95


def test_sequential_run_records_schedule_and_both_evaluations(tiny_world, tiny_model, tiny_requests):
    model, tokenizer = tiny_model
    requests = tiny_requests[:4]
    seen = []
    result = run_sequential(model, tokenizer, requests, "kdpo", corpus=tiny_world.corpus(), progress=False,
                            on_edit=seen.append, fluency_tokens=8)
    summary = result.summary()
    assert result.schedule == SCHEDULE and "immediate" in SCHEDULE and "after the last edit" in SCHEDULE
    assert [r.index for r in seen] == [0, 1, 2, 3] and len(result.final) == 4
    assert summary["immediate"]["edit_success"] >= 0.75
    assert 0.0 <= summary["final"]["locality"] <= 1.0 and summary["fluency_before"] is not None
    document = result.to_dict()
    assert document["schedule"] == SCHEDULE and set(document["protocol"]) >= {"edit_success", "locality", "retention"}
    accuracies, _ = score_pairs(model, tokenizer, [(r.prompt, r.target_new) for r in requests])  # the model now
    assert [r["held"] for r in document["records"]] == [a == 1.0 for a in accuracies]
    assert all(len(r["losses"]) == r["steps"] for r in document["records"])


def test_baseline_probe_scores_locality_against_itself(tiny_model, tiny_requests):
    model, tokenizer = tiny_model
    baseline = probe(model, tokenizer, tiny_requests[:3], fluency_tokens=8)
    assert all(s.locality == 1.0 for s in baseline.scores)
    assert len(baseline.answers) == 3 and all(isinstance(a, str) for a in baseline.answers)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"memory.modules": "layers.9.mlp.down_proj"}, "no module named"),
        ({"weights.modules": "layers.9.mlp.down_proj", "protection": "none"}, "no module named"),
        ({"null_space.threshold": "2", "protection": "null-space"}, "null_space.threshold must be in"),
        ({"null_space.threshhold": "2"}, "has no setting 'null_space.threshhold'; settings: .*null_space.threshold"),
        ({"memory": "big"}, "'memory' is a block of settings: set memory.NAME=VALUE"),
        ({"protection": "magic"}, "protection must be one of"),
        ({"learning_rate": "1"}, "has no setting 'learning_rate'"),
        ({"memory.lr": "fast"}, "expects float"),
    ],
)
def test_bad_settings_give_clear_errors(tiny_model, overrides, message):
    model, tokenizer = tiny_model
    with pytest.raises((ConfigError, ValueError), match=message):
        build_editor(model, tokenizer, "kdpo", make_config("kdpo", overrides=overrides), corpus=["a b c"])


def test_null_space_without_corpus_is_a_clear_error(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(ConfigError, match="needs a corpus"):
        build_editor(model, tokenizer, "kdpo", make_config("kdpo", overrides={"protection": "null-space"}), corpus=None)


def test_paper_preset_is_a_named_config():
    kdpo = make_config("kdpo", "paper")
    assert kdpo.protection == "none" and kdpo.stop_margin == 0.0 and kdpo.nll_weight == 0.0 and kdpo.weights.lr == 2e-5
    assert kdpo.weights.modules == ("layers.2.mlp.down_proj",) and not kdpo.weights.minimal_change
    ft_m = make_config("ft-m", "paper", {"weights.lr": "1e-3", "weights.minimal_change": "true"})  # DPO-only fields are
    assert ft_m.weights.lr == 1e-3 and not hasattr(ft_m, "beta")  # skipped, overrides still win, inside a block too
    assert ft_m.weights == type(ft_m.weights)(modules=("layers.2.mlp.down_proj",), lr=1e-3, minimal_change=True)


def test_a_block_of_settings_is_set_by_dotted_keys_or_a_mapping(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("memory:\n  rank: 8\n  preserve_weight: 2\n")
    from_file = make_config("ft-m", settings, {"memory.preserve_weight": "3"})
    dotted = make_config("ft-m", overrides={"memory.rank": "8", "memory.preserve_weight": "3"})
    assert from_file == dotted and dotted.memory.rank == 8 and dotted.memory.preserve_weight == 3.0
    assert dotted.memory.modules == make_config("ft-m").memory.modules  # the block's other settings: defaults
    flat = flat_settings(dotted)
    assert flat["memory.rank"] == 8 and flat["null_space.threshold"] == 1e-3 and "memory" not in flat
    with pytest.raises(ConfigError, match="cannot read settings file"):
        make_config("kdpo", "no-such-preset")


def test_scoring_splits_a_batch_whose_logits_exceed_the_budget(tiny_model, tiny_requests, monkeypatch):
    import kdpo.evaluation

    model, tokenizer = tiny_model
    pairs = [(prompt, r.target_new) for r in tiny_requests[:8] for prompt in (r.prompt, *r.rephrase_prompts)]
    whole = score_pairs(model, tokenizer, pairs)
    passes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: passes.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    monkeypatch.setattr(kdpo.evaluation, "LOGITS_BUDGET_BYTES", 1)  # one pair per forward pass
    try:
        assert score_pairs(model, tokenizer, pairs) == whole
    finally:
        hook.remove()
    assert passes == [1] * len(pairs)


@pytest.mark.parametrize("shape", ["llama", "gpt2"])
def test_logits_at_answer_columns_equal_the_whole_forward(tiny_world, shape):
    from test_memory import random_model  # the Llama- and GPT-2-shaped models the memory is tested on
    from kdpo.modeling import Logits, encode_pairs, load_model

    _, tokenizer = load_model(tiny_world.path)
    model, _ = random_model(tokenizer, shape)
    batch = encode_pairs(tokenizer, [("The capital of France is", "Paris"), ("A", "much longer answer here")])
    logits, compact = Logits(model), batch.at_answers()
    with torch.no_grad():
        whole = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        picked = logits(compact)
    assert logits.split and picked.shape[:2] == compact.labels.shape
    expected = whole[batch.answer_mask]  # row-major, as the compact labels are filled
    scale = float(whole.abs().max())
    # the same float32 ops on the same hidden states: differences are rounding of sums over the hidden size
    assert torch.allclose(picked[compact.answer_mask], expected, rtol=0, atol=1e-5 * scale)
    assert torch.equal(compact.labels[compact.answer_mask], batch.labels[batch.answer_mask])


def test_logits_of_a_model_whose_logits_are_more_than_its_head_are_read_whole(tiny_model):
    from kdpo.modeling import Logits, encode_pairs

    model, tokenizer = tiny_model
    model.register_forward_hook(lambda module, args, output: output.__class__(logits=output.logits * 2))  # scaled
    logits = Logits(model)
    batch = encode_pairs(tokenizer, [("The capital of France is", "Paris")])
    whole = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not logits.split
    assert torch.equal(logits(batch.at_answers())[0], whole[batch.answer_mask])
