"""Null-space protection: threshold rules, key statistics for any model (corpus readers, disk cache),
protection of each committed edit's keys, and the weight-drift monitor."""
import pytest
import torch

from conftest import TINY_EDIT
from kdpo.config import ConfigError
from kdpo.editing import build_editor, make_config, run_sequential
from kdpo.editors.base import module_inputs, restrict_to_keys
from kdpo.layers import find_module
from kdpo.keystats import key_covariances, keystats_root, read_corpus
from kdpo.modeling import encode_pairs
from kdpo.protection import ProtectedSubspace

MODULES = ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
NULL_SPACE = {"protection": "null-space", **TINY_EDIT}


def test_energy_rule_keeps_the_fewest_directions_holding_the_energy():
    eigenvalues = torch.tensor([100.0, 10.0, 1.0, 0.1, 0.01])
    basis = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0)))[0]
    covariance = basis @ torch.diag(eigenvalues) @ basis.T
    # 100 / 111.11 = 0.900, 110 / 111.11 = 0.990, 111 / 111.11 = 0.999
    assert ProtectedSubspace.from_key_covariance(covariance, 0.05).rank == 2
    assert ProtectedSubspace.from_key_covariance(covariance, 0.005).rank == 3


def test_read_corpus_formats_budget_and_errors(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("one passage\n\nanother passage\nthird\n")
    assert read_corpus(text) == ["one passage", "another passage", "third"]
    assert sorted(read_corpus(text, budget=2, seed=1)) == sorted(read_corpus(text, budget=2, seed=1))
    assert len(read_corpus(text, budget=2)) == 2
    table = tmp_path / "corpus.jsonl"
    table.write_text('{"text": "a fact"}\n{"text": "another fact", "id": 2}\n')
    assert read_corpus(table) == ["a fact", "another fact"]
    with pytest.raises(ConfigError, match="no column 'body'"):
        read_corpus(table, text_field="body")
    with pytest.raises(ConfigError, match="no such file"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_corpus(tmp_path / "blank.txt")


def test_key_statistics_are_cached_and_invalidated_by_new_weights(tiny_world, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KDPO_HOME", str(tmp_path))
    model, tokenizer = tiny_model
    corpus = tiny_world.corpus()[:40]
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    first = key_covariances(model, tokenizer, MODULES, corpus)
    computed = len(calls)
    assert computed > 0 and len(list(keystats_root().glob("*.pt"))) == 1
    again = key_covariances(model, tokenizer, MODULES, corpus)
    assert len(calls) == computed  # read from disk, the model did not run
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    changed = key_covariances(model, tokenizer, MODULES, corpus)
    assert len(calls) > computed and len(list(keystats_root().glob("*.pt"))) == 2
    assert not torch.allclose(changed[0], first[0])


def test_committed_edit_protects_its_prompt(tiny_world, tiny_model, tiny_requests):
    model, tokenizer = tiny_model
    request = tiny_requests[0]
    config = make_config("ft-m", overrides=NULL_SPACE | {"null_space.edit_keys": "hard"})
    editor = build_editor(model, tokenizer, "ft-m", config, tiny_world.corpus())
    editor.edit(request)
    prompts = [request.prompt]
    batch = encode_pairs(tokenizer, [(p, request.target_new) for p in prompts])
    captured = module_inputs(model, editor.modules, batch.input_ids, batch.attention_mask)
    for subspace, inputs in zip(editor.protected, captured):
        keys = inputs[batch.answer_mask]
        assert len(keys) >= len(prompts)
        residual = keys - keys @ subspace.basis @ subspace.basis.T
        assert (residual.norm(dim=1) <= 0.05 * keys.norm(dim=1) + 1e-4).all()


def test_soft_edit_keys_remember_the_prompt_and_keep_the_barred_span(tiny_world, tiny_model, tiny_requests):
    model, tokenizer = tiny_model
    request = tiny_requests[0]
    editor = build_editor(model, tokenizer, "kdpo", make_config("kdpo", overrides=NULL_SPACE), tiny_world.corpus())
    ranks = [subspace.rank for subspace in editor.protected]
    assert editor.edit(request).reached
    batch = encode_pairs(tokenizer, [(request.prompt, request.target_new)])
    captured = module_inputs(model, editor.modules, batch.input_ids, batch.attention_mask)
    for subspace, inputs, rank in zip(editor.protected, captured, ranks):
        assert subspace.rank == rank  # soft memory: nothing is barred
        projected = subspace.project(inputs[batch.answer_mask])
        remembered = torch.einsum("ni,ij,nj->n", projected, subspace.key_gram, projected)
        assert (remembered >= 0.99 * projected.norm(dim=1) ** 4).all()


def test_restricting_a_change_to_its_keys_keeps_their_outputs_and_shrinks_it():
    generator = torch.Generator().manual_seed(0)
    keys, delta = torch.randn(5, 64, generator=generator), torch.randn(64, 8, generator=generator)
    restricted = restrict_to_keys(delta, keys)
    assert torch.allclose(keys @ restricted, keys @ delta, atol=1e-4)
    assert restricted.norm() < 0.5 * delta.norm()
    other = torch.randn(64, generator=generator)
    other -= keys.T @ torch.linalg.lstsq(keys.T, other).solution  # orthogonal to every key
    assert (other @ restricted).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["kdpo", "ft-m"])
def test_minimal_change_commits_a_smaller_change_with_the_same_edit(tiny_world, tiny_model, tiny_requests, method):
    model, tokenizer = tiny_model
    request = tiny_requests[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    outcomes, answers = {}, {}
    for minimal in ("false", "true"):
        model.load_state_dict(state)
        config = make_config(method, overrides=NULL_SPACE | {"weights.minimal_change": minimal, "null_space.edit_keys": "hard"})
        editor = build_editor(model, tokenizer, method, config, tiny_world.corpus())
        outcomes[minimal] = editor.edit(request)
        batch = encode_pairs(tokenizer, [(request.prompt, request.target_new)])
        with torch.no_grad():
            answers[minimal] = model(input_ids=batch.input_ids).logits[batch.labels != -100].argmax(-1)
    model.load_state_dict(state)
    assert outcomes["true"].reached and outcomes["false"].reached
    assert torch.equal(answers["true"], answers["false"])
    assert outcomes["true"].delta_norm < 0.95 * outcomes["false"].delta_norm


def test_weight_drift_is_recorded_per_edit(tiny_world, tiny_model, tiny_requests):
    model, tokenizer = tiny_model
    before = {name: model.get_submodule(f"model.{name}").weight.detach().clone() for name in MODULES}
    result = run_sequential(model, tokenizer, tiny_requests[:3], "kdpo", make_config("kdpo", overrides=NULL_SPACE),
                            tiny_world.corpus(), progress=False, fluency_tokens=0)
    drifts = [record.drift for record in result.records]
    assert all(set(d) == set(MODULES) for d in drifts)
    for name in MODULES:
        final = float((model.get_submodule(f"model.{name}").weight - before[name]).norm())
        assert drifts[-1][name] == pytest.approx(final, rel=1e-5) and final > 0
    assert result.to_dict()["records"][0]["drift"] == drifts[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"null_space.threshold": "0"}, "null_space.threshold must be in"),
        ({"null_space.corpus_key_weight": "-1"}, "null_space.corpus_key_weight must be >= 0"),
        ({"null_space.edit_keys": "firm"}, "null_space.edit_keys must be one of"),
        ({"weights.minimal_change": "false"}, "needs weights.minimal_change"),
        ({"null_space.edit_keys": "hard", "null_space.corpus_key_weight": "1"}, "needs edit_keys 'soft'"),
        ({"memory.rank": "8"}, "the memory settings have no effect with protection 'null-space'"),
    ],
)
def test_bad_protection_settings_are_clear_errors(overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        make_config("kdpo", overrides={"protection": "null-space"} | overrides).validate()


@pytest.mark.parametrize(
    "overrides, ignored",
    [({}, "weights.modules"), ({}, "null_space.edit_keys"), ({"protection": "none"}, "null_space.commit_ridge"),
     ({"protection": "none"}, "memory.preserve_weight")],
)
def test_a_setting_the_protection_never_reads_is_rejected(overrides, ignored):
    value = {"weights.modules": "layers.0.mlp.down_proj", "null_space.edit_keys": "hard",
             "null_space.commit_ridge": "1", "memory.preserve_weight": "2"}[ignored]
    block = ignored.split(".")[0]
    with pytest.raises((ConfigError, ValueError), match=f"^kdpo: the {block} settings have no effect with protection"):
        make_config("kdpo", overrides=overrides | {ignored: value})


def test_module_inputs_stop_the_forward_pass_once_every_module_has_its_input(tiny_model):
    model, tokenizer = tiny_model
    batch = encode_pairs(tokenizer, [("The capital of France is", "Paris")])
    modules = [find_module(model, f"model.layers.{i}.mlp.down_proj") for i in (1, 0)]
    full: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda m, args: full.append(args[0])) for m in modules]
    later_layers_ran = []  # the output head, above every edited module
    last = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: later_layers_ran.append(1))
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for handle in handles:
        handle.remove()
    assert later_layers_ran
    later_layers_ran.clear()
    inputs = module_inputs(model, modules, batch.input_ids, batch.attention_mask)
    last.remove()
    assert torch.equal(inputs[0], full[1]) and torch.equal(inputs[1], full[0])  # in the order the modules were given
    assert not later_layers_ran
    with pytest.raises(RuntimeError, match="never ran"):
        module_inputs(model, [torch.nn.Linear(2, 2)], batch.input_ids, batch.attention_mask)


def test_soft_memory_woodbury_updates_equal_the_direct_solve():
    torch.manual_seed(0)
    dim, ridge = 24, 1e-2
    subspace = ProtectedSubspace(torch.linalg.qr(torch.randn(dim, 6)).Q)
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    for weight in (1.0, 0.5, 2.0):  # three edits' keys, remembered one after another
        keys = torch.randn(5, dim)
        subspace.add_soft_keys(keys, weight, ridge)
        projected = subspace.project(keys).double()
        gram += weight * projected.T @ projected
    assert torch.allclose(subspace.key_gram.double(), gram, rtol=1e-5, atol=1e-5)  # G is returned as float32
    keys, delta = subspace.project(torch.randn(4, dim)), torch.randn(dim, 3)
    direct = torch.linalg.solve(keys.double().T @ keys.double() + gram + ridge * torch.eye(dim, dtype=torch.float64),
                                keys.double().T @ (keys.double() @ delta.double()))
    assert torch.allclose(subspace.fit_change(keys, delta).double(), direct, atol=1e-4)
    restored = ProtectedSubspace.from_state_dict(subspace.state_dict())
    assert torch.equal(restored.soft_inverse, subspace.soft_inverse) and restored.soft_ridge == ridge
    legacy = ProtectedSubspace.from_state_dict({"basis": subspace.basis, "key_gram": gram.float()}, ridge)  # G itself
    assert torch.allclose(legacy.soft_inverse, subspace.soft_inverse, rtol=1e-3, atol=1e-3)


def test_corpus_covariance_starts_the_soft_memory_and_steers_the_fit_away_from_corpus_keys():
    torch.manual_seed(0)
    dim, ridge = 16, 1e-2
    subspace = ProtectedSubspace(torch.linalg.qr(torch.randn(dim, 4)).Q)
    corpus = torch.randn(40, dim) * torch.linspace(3.0, 0.1, dim)  # a few strong directions, a long tail
    covariance = corpus.T @ corpus
    subspace.add_soft_covariance(covariance, weight=0.5, ridge=ridge)
    projector = torch.eye(dim) - subspace.basis @ subspace.basis.T
    expected = 0.5 * projector @ covariance @ projector  # G = w P C P: the hard null space's span left out
    assert torch.allclose(subspace.key_gram, expected, rtol=1e-3, atol=1e-3)  # G is returned as float32
    keys, delta = subspace.project(torch.randn(2, dim)), torch.randn(dim, 3)
    plain = ProtectedSubspace(subspace.basis)
    plain.add_soft_keys(torch.zeros(1, dim), 1.0, ridge)  # an empty soft memory
    with_corpus, without = subspace.fit_change(keys, delta), plain.fit_change(keys, delta)
    assert (corpus @ projector @ with_corpus).norm() < 0.5 * (corpus @ projector @ without).norm()
    with pytest.raises(ValueError, match="already holds keys"):
        subspace.add_soft_covariance(covariance, weight=0.5)


def test_corpus_key_weight_starts_the_soft_memory_of_every_module(tiny_world, tiny_model, tiny_requests):
    model, tokenizer = tiny_model
    corpus = tiny_world.corpus()
    soft_config = make_config("kdpo", overrides=NULL_SPACE | {"null_space.corpus_key_weight": "1e-3"})
    soft = build_editor(model, tokenizer, "kdpo", soft_config, corpus)
    assert all(subspace.soft_inverse is not None for subspace in soft.protected)
    plain = make_config("kdpo", overrides=NULL_SPACE)  # no corpus keys: the soft memory starts with the first edit
    assert all(subspace.soft_inverse is None for subspace in build_editor(model, tokenizer, "kdpo", plain, corpus).protected)
    assert soft.edit(tiny_requests[0]).delta_norm > 0  # the fit commits a change around the corpus keys
