"""The knowledge world: the shipped fact table, the build, the cache, and worlds from edit files."""
import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdpo.loaders import EditDataError, load_requests, write_jsonl
from kdpo.requests import EditRequest
from kdpo.config import ConfigError
from kdpo.world import WorldConfig, build_world, world_config
from kdpo.world.build import DATA, generated_people, request_facts, table_facts, table_sources, world_key
from shared_data import shared_file

MICRO = {"max_facts": 40, "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "max_epochs": 2}


def test_fact_table_is_big_and_varied_enough():
    relations = json.loads((DATA / "relations.json").read_text())
    with open(DATA / "facts.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) >= 1000 and len(relations) >= 8
    assert all(len(r["templates"]) >= 3 and all(t.count("{}") == 1 for t in r["templates"]) for r in relations.values())
    assert len({(r["subject"], r["relation"]) for r in rows}) == len(rows)
    for relation in relations:
        assert len({r["answer"] for r in rows if r["relation"] == relation}) >= 5, relation


def test_default_edits_are_counterfactual_and_never_probe_each_other():
    training, held_out, edits = table_facts(WorldConfig())
    assert len(edits) >= 100 and len({e.case_id for e in edits}) == len(edits)
    edited_prompts = {e.prompt for e in edits}
    for edit in edits:
        assert edit.target_new != edit.ground_truth and edit.subject in edit.prompt
        assert len(edit.rephrase_prompts) >= 2 and len(edit.locality) >= 2
        assert not edited_prompts & {item.prompt for item in edit.locality}
    # the last paraphrase of every edited fact is held out of training, for a fair generalization test
    trained = {f.prompt for f in training}
    assert all(e.rephrase_prompts[-1] not in trained for e in edits)
    assert {f.prompt for f in held_out} == {e.rephrase_prompts[-1] for e in edits}


def test_generated_people_are_new_names_with_a_table_answer_per_relation():
    with open(DATA / "facts.csv", newline="") as handle:
        table = [(r["subject"], r["relation"], r["answer"]) for r in csv.DictReader(handle)]
    rows, relations = generated_people(300, 0, table)
    people = {subject for subject, _, _ in rows}
    assert len(people) == 300 and not people & {subject for subject, _, _ in table}
    assert len(rows) == 300 * len(relations) and all(len(r["templates"]) >= 3 for r in relations.values())
    table_answers = {value for row in table for value in (row[0], row[2])}
    assert {answer for _, _, answer in rows} <= table_answers
    assert generated_people(300, 0, table) == (rows, relations) and generated_people(300, 1, table)[0] != rows


def test_large_preset_has_10k_edit_requests_and_default_keys_stay():
    config = world_config({"preset": "large", "seed": "1"})
    assert config.people > 0 and config.seed == 1 and config.max_facts == 0
    training, held_out, edits = table_facts(config)
    assert len(edits) >= 10_000 and len({e.case_id for e in edits}) == len(edits)
    person = next(e for e in edits if e.case_id.startswith("employer:"))
    assert person.subject in person.prompt and len(person.rephrase_prompts) == 2 and person.locality
    assert {f.prompt for f in held_out} == {e.rephrase_prompts[-1] for e in edits}
    # people enter the key (file and setting); a world without them keeps the key it had before they existed
    assert DATA / "people.json" in table_sources(config) and table_sources(WorldConfig()) == [DATA / "facts.csv", DATA / "relations.json"]
    assert world_key(table_sources(WorldConfig()), WorldConfig()) == "966c4703b2b40e08"  # the docs' default world
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose from large"):
        world_config({"preset": "huge"})


def test_tiny_world_is_a_loadable_hf_model_that_knows_facts(tiny_world):
    model = AutoModelForCausalLM.from_pretrained(tiny_world.path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_world.path)
    assert model.config.model_type == "llama" and tokenizer.pad_token == "<pad>"
    assert tiny_world.info["recall"]["main"] >= 0.9 and tiny_world.info["recall"]["paraphrase"] >= 0.9
    assert tiny_world.info["recall_met"] is (min(tiny_world.info["recall"][k] for k in ("main", "paraphrase")) >= 0.97)
    assert len(load_requests(tiny_world.edits_path).requests) == tiny_world.info["edits"]
    corpus = "\n".join(tiny_world.corpus())
    assert corpus.count(".") >= sum(tiny_world.info["facts"].values())  # every fact, in its training form
    assert all(f"{r.prompt} {r.ground_truth}." in corpus for r in load_requests(tiny_world.edits_path).requests)


def test_build_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPO_HOME", str(tmp_path / "home"))
    config = WorldConfig(**MICRO)
    with pytest.warns(UserWarning, match="did not reach recall"):  # two epochs teach it nothing, and it says so
        first = build_world(config, progress=False)
    assert first.info["recall_met"] is False
    again = build_world(config, progress=False)
    assert again.info["cached"] is True and again.path == first.path
    rebuilt = build_world(config, out=tmp_path / "other", progress=False)
    for name, weight in AutoModelForCausalLM.from_pretrained(first.path).state_dict().items():
        assert torch.equal(weight, AutoModelForCausalLM.from_pretrained(rebuilt.path).state_dict()[name]), name
    assert world_key([DATA / "facts.csv"], WorldConfig(**MICRO, seed=1)) != world_key([DATA / "facts.csv"], config)


def test_world_from_an_edit_file_learns_its_true_facts(tmp_path, tiny_requests):
    path = tmp_path / "edits.jsonl"
    write_jsonl(tiny_requests[:5], path)
    training, held_out, requests = request_facts(load_requests(path).requests, path)
    assert held_out == [] and len(requests) == 5
    answers = {f.prompt: f.answer for f in training}
    for request in requests:
        assert answers[request.prompt] == request.ground_truth  # the true answer, never target_new
        assert all(answers[item.prompt] == item.ground_truth for item in request.locality)
    names = [f.answer for f in training if f.kind == "name"]
    learned = {f.answer for f in training if f.kind != "name"}
    assert set(names) == {r.target_new for r in requests} - learned  # the names a pre-trained model would know
    assert names and all(f.prompt == "" for f in training if f.kind == "name")
    world = build_world(WorldConfig(**MICRO), from_file=path, out=tmp_path / "w", progress=False)
    assert world.info["edits"] == 5 and world.info["source"] == str(path)
    assert world.info["facts"]["name"] == len(names) and "name" not in world.info["recall"]
    assert all(f"{name}." in (world.path / "corpus.txt").read_text() for name in names)


def test_world_facts_from_shared_counterfact():
    path = shared_file("counterfact-edit-2k.json")
    training, _, requests = request_facts(load_requests(path).requests, path)
    assert len(requests) == 2000 and len(training) >= 4000


def test_a_file_without_true_answers_is_a_one_line_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPO_HOME", str(tmp_path / "home"))
    path = tmp_path / "edits.jsonl"
    write_jsonl([EditRequest("a", "Ann", "Ann lives in", "Lima")], path)
    with pytest.raises(EditDataError) as error:
        build_world(WorldConfig(**MICRO), from_file=path, progress=False)
    assert str(error.value) == f"{path}: no request has a ground_truth, so there is no true fact to learn"
    assert not (tmp_path / "home").exists()  # refused before anything was written
