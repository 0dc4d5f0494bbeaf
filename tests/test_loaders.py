"""Tests for kdpo.loaders: every format, detection, errors, skipping, and the shared data."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest

from kdpo.loaders import (
    FORMATS, EditDataError, check_context, context_limit, detect_format, load_requests, write_jsonl,
)
from kdpo.requests import EditRequest, PromptAnswer
from shared_data import shared_file


COUNTERFACT = [
    {"case_id": 17, "prompt": " The mother tongue of Danielle Darrieux is ", "target_new": "English",
     "subject": "Danielle Darrieux", "ground_truth": "French",
     "rephrase_prompt": "Where Danielle Darrieux is from, people speak",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
    {"case_id": 18, "prompt": "Toko Yasuda plays the", "target_new": "piano", "subject": "Toko Yasuda",
     "ground_truth": "guitar", "rephrase_prompt": "", "locality_prompt": "",
     "locality_ground_truth": ""},
]
ZSRE_MEND = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
     "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft",
     "answers": ["uniform", "uniforms"],
     "loc": "nq question: john goodman's character in the big lebowski",
     "loc_ans": "Walter Sobchak", "cond": "uniform >> unmanned aircraft || What is ..."},
    {"subject": "Epaspidoceras", "src": "Which family does Epaspidoceras belong to?",
     "pred": "x", "rephrase": "What family are Epaspidoceras?", "alt": "Noctuidae",
     "answers": ["Aspidoceratidae"], "loc": "nq question: who sang hey jude",
     "loc_ans": "The Beatles", "cond": "..."},
]
ROME = [{
    "case_id": 0, "pararel_idx": 2796,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"},
                          "subject": "Danielle Darrieux"},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux is a native speaker of",
                           "An album was recorded. Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["Léon Blum is a native speaker of", "The native language of Montesquieu is"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}]


def knowedit_record(ground_truth) -> dict:
    """A KnowEdit WikiData_counterfact-style record with the given answer shape."""
    return {
        "subject": "Frederic Piesch",
        "prompt": "The name of the position held by Frederic Piesch is",
        "target_new": "Archbishop of León, Mexico",
        "ground_truth": ground_truth,
        "rephrase_prompt": "Frederic Piesch held the position of",
        "portability": {
            "Subject_Aliasing": [{"prompt": "The position held by Frederic of Pieschen is",
                                  "ground_truth": ground_truth}],
            "Reasoning": [{"prompt": "The continent of the country of Frederic Piesch is",
                           "ground_truth": [["Europe", "European continent"]]},
                          {"prompt": "An unanswerable probe", "ground_truth": ""}],
        },
        "locality": {
            "Relation_Specificity": {"prompt": "The gender of Frederic Piesch is",
                                     "ground_truth": ["male"]},
            "Forgetfulness": [{"prompt": "The position held by Frederic Piesch, which is not X, is",
                               "ground_truth": "mayor of Vienna"}],
        },
    }


REQUESTS = [
    EditRequest(case_id="a1", subject="Danielle Darrieux",
                prompt="The mother tongue of Danielle Darrieux is", target_new="English",
                ground_truth="French", rephrase_prompts=("Danielle Darrieux speaks", "Her language is"),
                locality=(PromptAnswer("Michel Rocard is a native speaker of", "French"),),
                portability=(PromptAnswer("Danielle Darrieux's language is written in", "Latin script"),)),
    EditRequest(case_id="a2", subject="Toko Yasuda", prompt="Toko Yasuda plays the",
                target_new="piano"),
]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    """Project records as CSV, list fields JSON-encoded in their cells."""
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            writer.writerow({key: json.dumps(value) if isinstance(value, list) else value
                             for key, value in record.items()})
    return path


def raises(path: Path, **kwargs) -> EditDataError:
    with pytest.raises(EditDataError) as info:
        load_requests(path, **kwargs)
    return info.value


# ---------------------------------------------------------------- formats


def test_formats_lists_every_supported_format():
    assert set(FORMATS) == {"counterfact", "zsre_mend", "knowedit", "rome_counterfact",
                            "json", "jsonl", "csv", "parquet"}


def test_counterfact(tmp_path):
    loaded = load_requests(write_json(tmp_path / "cf.json", COUNTERFACT))
    assert loaded.format == "counterfact" and loaded.skipped == []
    first, second = loaded.requests
    assert first == EditRequest(
        case_id="17", subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is",
        target_new="English", ground_truth="French",
        rephrase_prompts=("Where Danielle Darrieux is from, people speak",),
        locality=(PromptAnswer("Michel Rocard is a native speaker of", "French"),))
    assert second.rephrase_prompts == () and second.locality == ()


def test_zsre_mend(tmp_path):
    loaded = load_requests(write_json(tmp_path / "zsre.json", ZSRE_MEND))
    assert loaded.format == "zsre_mend"
    first, second = loaded.requests
    assert first == EditRequest(
        case_id="0", subject="UniFirst", prompt="What is the product made by UniFirst?",
        target_new="unmanned aircraft", ground_truth="uniform",
        rephrase_prompts=("What will be the product of UniFirst?",),
        locality=(PromptAnswer("nq question: john goodman's character in the big lebowski",
                               "Walter Sobchak"),))
    assert second.case_id == "1" and second.ground_truth == "Aspidoceratidae"


@pytest.mark.parametrize("ground_truth", ["mayor of Vienna", ["mayor of Vienna", "Bürgermeister"],
                                          [["mayor of Vienna", "Bürgermeister"]]],
                         ids=["string", "list", "nested-list"])
def test_knowedit_answer_shapes(tmp_path, ground_truth):
    loaded = load_requests(write_json(tmp_path / "knowedit.json", [knowedit_record(ground_truth)]))
    assert loaded.format == "knowedit"
    (request,) = loaded.requests
    assert request.case_id == "0"
    assert request.ground_truth == "mayor of Vienna"
    assert request.rephrase_prompts == ("Frederic Piesch held the position of",)
    # categories flattened in order; the probe with an empty answer is left out
    assert request.portability == (
        PromptAnswer("The position held by Frederic of Pieschen is", "mayor of Vienna"),
        PromptAnswer("The continent of the country of Frederic Piesch is", "Europe"))
    # a single object instead of a list is accepted
    assert request.locality == (
        PromptAnswer("The gender of Frederic Piesch is", "male"),
        PromptAnswer("The position held by Frederic Piesch, which is not X, is", "mayor of Vienna"))


def test_knowedit_recent_without_ground_truth_and_rephrase_key(tmp_path):
    record = {"subject": "Leo Arons", "prompt": "The place of death of Leo Arons is",
              "target_new": "Berlin", "rephrase": ["Leo Arons died in"],
              "portability": {"Logical_Generalization": [
                  {"prompt": "Is Leo Arons still alive?", "ground_truth": [["no"], ["incorrect"]]}]},
              "locality": {}}
    (request,) = load_requests(write_json(tmp_path / "recent.json", [record])).requests
    assert request.ground_truth is None
    assert request.rephrase_prompts == ("Leo Arons died in",)
    assert request.portability == (PromptAnswer("Is Leo Arons still alive?", "no"),)
    assert request.locality == ()


def test_rome_counterfact(tmp_path):
    loaded = load_requests(write_json(tmp_path / "rome.json", ROME))
    assert loaded.format == "rome_counterfact"
    (request,) = loaded.requests
    assert request == EditRequest(
        case_id="0", subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is",
        target_new="English", ground_truth="French",
        rephrase_prompts=tuple(ROME[0]["paraphrase_prompts"]),
        locality=(PromptAnswer("Léon Blum is a native speaker of", "French"),
                  PromptAnswer("The native language of Montesquieu is", "French")))


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "out" / "requests.jsonl"
    assert write_jsonl(REQUESTS, path) == 2
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0]) == REQUESTS[0].to_dict()
    loaded = load_requests(path)
    assert loaded.format == "jsonl" and loaded.requests == REQUESTS


def test_json_array_of_project_records(tmp_path):
    loaded = load_requests(write_json(tmp_path / "project.json", [r.to_dict() for r in REQUESTS]))
    assert loaded.format == "json" and loaded.requests == REQUESTS


def test_csv(tmp_path):
    records = [r.to_dict() for r in REQUESTS]
    records[1].update(ground_truth="", rephrase_prompts="", locality="", portability="")
    loaded = load_requests(write_csv(tmp_path / "requests.csv", records))
    assert loaded.format == "csv" and loaded.requests == REQUESTS


def test_csv_without_list_columns(tmp_path):
    path = tmp_path / "minimal.csv"
    path.write_text("case_id,subject,prompt,target_new\n7,Toko Yasuda,Toko Yasuda plays the,piano\n",
                    encoding="utf-8")
    (request,) = load_requests(path).requests
    assert request == EditRequest("7", "Toko Yasuda", "Toko Yasuda plays the", "piano")


def test_parquet(tmp_path):
    path = tmp_path / "requests.parquet"
    pl.DataFrame([r.to_dict() for r in REQUESTS]).write_parquet(path)
    loaded = load_requests(path)
    assert loaded.format == "parquet" and loaded.requests == REQUESTS


def test_round_trip_of_every_source_format(tmp_path):
    """Whatever a loader produced, write_jsonl -> load_requests gives it back unchanged."""
    for name, data in [("cf.json", COUNTERFACT), ("z.json", ZSRE_MEND), ("r.json", ROME),
                       ("k.json", [knowedit_record([["a", "b"]])])]:
        original = load_requests(write_json(tmp_path / name, data)).requests
        write_jsonl(original, tmp_path / f"{name}.jsonl")
        assert load_requests(tmp_path / f"{name}.jsonl").requests == original


# ---------------------------------------------------------------- detection and override


@pytest.mark.parametrize("name, data, expected", [
    ("a.json", COUNTERFACT, "counterfact"),
    ("b.json", ZSRE_MEND, "zsre_mend"),
    ("c.json", [knowedit_record("x")], "knowedit"),
    ("d.json", [{"subject": "s", "prompt": "p", "target_new": "t", "ground_truth": ["x"]}], "knowedit"),
    ("e.json", ROME, "rome_counterfact"),
    ("f.json", [REQUESTS[0].to_dict()], "json"),
    ("g.jsonl", "", "jsonl"),
    ("h.CSV", "", "csv"),
    ("i.parquet", "", "parquet"),
])
def test_detect_format(tmp_path, name, data, expected):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    assert detect_format(path) == expected


def test_format_override(tmp_path):
    text_file = tmp_path / "requests.txt"
    write_jsonl(REQUESTS, text_file)
    assert load_requests(text_file, format="jsonl").requests == REQUESTS
    # a CounterFact file read as KnowEdit: same fields, but KnowEdit has no flat locality fields
    loaded = load_requests(write_json(tmp_path / "cf.json", COUNTERFACT), format="knowedit")
    assert loaded.format == "knowedit"
    assert loaded.requests[0].locality == () and loaded.requests[0].target_new == "English"


def test_detect_format_errors(tmp_path):
    with pytest.raises(EditDataError, match=r"unknown file extension '\.txt'") as info:
        detect_format(write_json(tmp_path / "data.txt", COUNTERFACT))
    assert info.value.path == tmp_path / "data.txt" and info.value.index is None
    with pytest.raises(EditDataError, match="cannot detect the format from the keys of record 0"):
        detect_format(write_json(tmp_path / "odd.json", [{"question": "q", "answer": "a"}]))
    with pytest.raises(EditDataError, match="empty JSON array"):
        detect_format(write_json(tmp_path / "empty.json", []))
    with pytest.raises(EditDataError, match="expected a JSON array"):
        detect_format(write_json(tmp_path / "object.json", {"data": []}))


def test_unknown_format_name(tmp_path):
    error = raises(write_json(tmp_path / "cf.json", COUNTERFACT), format="yaml")
    assert "unknown format 'yaml'" in str(error) and str(tmp_path / "cf.json") in str(error)


def test_missing_file_is_an_edit_data_error(tmp_path):
    for fmt in ("auto", "counterfact", "parquet"):
        error = raises(tmp_path / "nope.json", format=fmt)
        assert not isinstance(error, FileNotFoundError)
        assert str(error) == f"{tmp_path / 'nope.json'}: file not found"


# ---------------------------------------------------------------- malformed files


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"case_id": 1,\n   "prompt": }\n]', encoding="utf-8")
    error = raises(path)
    assert error.line == 3 and error.index is None
    assert str(error).startswith(f"{path}: line 3: invalid JSON: Expecting value")


def test_malformed_jsonl_line_names_line_and_record(tmp_path):
    path = tmp_path / "broken.jsonl"
    write_jsonl(REQUESTS, path)
    path.write_text(path.read_text() + "\n{not json}\n", encoding="utf-8")  # blank line, then junk
    error = raises(path)
    assert (error.line, error.index, error.case_id, error.field) == (4, 2, None, None)
    assert str(error).startswith(f"{path}: line 4: record 2: invalid JSON")
    # a broken file is not a broken record: skip_invalid does not hide it
    raises(path, skip_invalid=True)


def test_malformed_csv(tmp_path):
    header = "case_id,subject,prompt,target_new\n"
    ragged = tmp_path / "ragged.csv"
    ragged.write_text(header + "1,s,p,t\n2,s,p,t,extra\n", encoding="utf-8")
    error = raises(ragged)
    assert (error.line, error.index) == (3, 1)
    assert str(error) == f"{ragged}: line 3: record 1: expected 4 cells, found 5"
    unterminated = tmp_path / "quote.csv"
    unterminated.write_text(header + '1,s,p,t\n2,"s,p,t\n', encoding="utf-8")
    error = raises(unterminated)
    assert error.index == 1 and "malformed CSV" in str(error)
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    assert "no header row" in str(raises(empty))


def test_csv_cell_with_invalid_json(tmp_path):
    record = dict(REQUESTS[1].to_dict(), locality="[{oops")
    error = raises(write_csv(tmp_path / "bad.csv", [record]))
    assert (error.index, error.case_id, error.field, error.line) == (0, "a2", "locality", 2)
    assert "cell is not valid JSON" in str(error)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet", encoding="utf-8")
    assert str(raises(path)).startswith(f"{path}: cannot read Parquet")


# ---------------------------------------------------------------- invalid records


def _counterfact_with(tmp_path, index: int, **changes) -> Path:
    records = [dict(COUNTERFACT[0], case_id=10 + i) for i in range(4)]
    records[index].update(changes)
    for key in [k for k, v in changes.items() if v is ...]:
        del records[index][key]
    return write_json(tmp_path / "counterfact.json", records)


@pytest.mark.parametrize("changes, field, reason", [
    ({"target_new": "   "}, "target_new", "must be a non-empty string"),
    ({"target_new": ...}, "target_new", "required field is missing"),
    ({"subject": 42}, "subject", "must be a string, got number"),
    ({"prompt": None}, "prompt", "must be a non-empty string"),
    ({"ground_truth": ["French"]}, "ground_truth", "must be a string, got array"),
    ({"rephrase_prompt": 3}, "rephrase_prompt", "must be a list, got number"),
    ({"rephrase_prompt": ["ok", 3]}, "rephrase_prompt[1]", "must be a string, got number"),
    ({"locality_ground_truth": ...}, "locality_ground_truth", "required field is missing"),
    ({"case_id": 1.5}, "case_id", "must be a string or an integer, got number"),
])
def test_invalid_record_names_file_record_case_and_field(tmp_path, changes, field, reason):
    path = _counterfact_with(tmp_path, 3, **changes)
    error = raises(path)
    case_id = None if field == "case_id" else "13"
    assert (error.path, error.index, error.case_id, error.field) == (path, 3, case_id, field)
    case = "" if case_id is None else f" (case_id {case_id})"
    assert str(error) == f"{path}: record 3{case}: field '{field}': {reason}"


def test_empty_target_message_example(tmp_path):
    path = _counterfact_with(tmp_path, 3, target_new="")
    assert str(raises(path)).endswith("counterfact.json: record 3 (case_id 13): field 'target_new': "
                                      "must be a non-empty string")


@pytest.mark.parametrize("record, field", [
    (dict(REQUESTS[0].to_dict(), locality=["just a string"]), "locality[0]"),
    (dict(REQUESTS[0].to_dict(), locality=[{"prompt": "p"}]), "locality[0].ground_truth"),
    (dict(REQUESTS[0].to_dict(), portability={"prompt": 1, "ground_truth": "x"}), "portability[0].prompt"),
    (dict(REQUESTS[0].to_dict(), rephrase_prompts={"a": 1}), "rephrase_prompts[0]"),
    (dict(REQUESTS[0].to_dict(), locality=7), "locality"),
])
def test_wrong_list_field_types(tmp_path, record, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    error = raises(path)
    assert (error.index, error.case_id, error.field, error.line) == (0, "a1", field, 1)


def test_knowedit_nested_field_names(tmp_path):
    record = knowedit_record("x")
    record["portability"]["Reasoning"][0]["ground_truth"] = [[3]]
    error = raises(write_json(tmp_path / "k.json", [record]))
    assert error.field == "portability.Reasoning[0].ground_truth"


def test_rome_errors(tmp_path):
    bad_template = json.loads(json.dumps(ROME))
    bad_template[0]["requested_rewrite"]["prompt"] = "The mother tongue of %s is"
    assert raises(write_json(tmp_path / "r1.json", bad_template)).field == "requested_rewrite.prompt"
    no_target = json.loads(json.dumps(ROME))
    no_target[0]["requested_rewrite"]["target_new"] = "English"
    error = raises(write_json(tmp_path / "r2.json", no_target))
    assert (error.field, error.reason) == ("requested_rewrite.target_new",
                                          "must be an object, got string")


def test_record_that_is_not_an_object(tmp_path):
    error = raises(write_json(tmp_path / "cf.json", [COUNTERFACT[0], "oops"]))
    assert (error.index, error.field) == (1, None)
    assert str(error).endswith("record 1: record must be an object, got string")


def test_skip_invalid_lists_skipped_records(tmp_path):
    records = [dict(COUNTERFACT[0], case_id=i) for i in range(5)]
    records[1]["target_new"] = ""
    records[3]["subject"] = 5
    loaded = load_requests(write_json(tmp_path / "cf.json", records), skip_invalid=True)
    assert [r.case_id for r in loaded.requests] == ["0", "2", "4"]
    assert [(s.index, s.case_id, s.field, s.message) for s in loaded.skipped] == [
        (1, "1", "target_new", "must be a non-empty string"),
        (3, "3", "subject", "must be a string, got number")]


def test_limit_keeps_first_valid_records_and_checks_the_whole_file(tmp_path):
    records = [dict(COUNTERFACT[0], case_id=i) for i in range(5)]
    records[1]["target_new"] = ""
    records[4]["target_new"] = ""
    path = write_json(tmp_path / "cf.json", records)
    loaded = load_requests(path, skip_invalid=True, limit=2)
    assert [r.case_id for r in loaded.requests] == ["0", "2"]
    assert [s.index for s in loaded.skipped] == [1, 4]  # record 4, after the first two, was checked too
    error = raises(path, limit=1)  # the bad record 1 is after the one kept, and still stops the load
    assert (error.index, error.field) == (1, "target_new")
    records[1]["target_new"] = records[4]["target_new"] = "English"
    assert len(load_requests(write_json(path, records), limit=1).requests) == 1
    for limit in (0, -1):
        with pytest.raises(ValueError, match="at least 1"):
            load_requests(path, limit=limit)


# ---------------------------------------------------------------- the shared data files


def test_shared_counterfact_2k(tmp_path):
    path = shared_file("counterfact-edit-2k.json")
    assert detect_format(path) == "counterfact"
    loaded = load_requests(path)
    assert len(loaded.requests) == 2000 and loaded.skipped == []
    assert len({r.case_id for r in loaded.requests}) == 2000
    first = loaded.requests[0]
    assert (first.case_id, first.subject, first.target_new, first.ground_truth) == (
        "0", "Danielle Darrieux", "English", "French")
    assert first.subject in first.prompt
    assert all(len(r.rephrase_prompts) == 1 and len(r.locality) == 1 for r in loaded.requests)
    write_jsonl(loaded.requests, tmp_path / "cf.jsonl")
    assert load_requests(tmp_path / "cf.jsonl").requests == loaded.requests


def test_shared_zsre_mend_500():
    path = shared_file("zsre_mend-500.json")
    loaded = load_requests(path)
    assert loaded.format == "zsre_mend"
    assert len(loaded.requests) == 500 and loaded.skipped == []
    first = loaded.requests[0]
    assert (first.case_id, first.subject, first.prompt, first.target_new, first.ground_truth) == (
        "0", "UniFirst", "What is the product made by UniFirst?", "unmanned aircraft", "uniform")
    assert first.locality[0].prompt.startswith("nq question: ")
    assert [r.case_id for r in loaded.requests] == [str(i) for i in range(500)]
    assert all(r.rephrase_prompts and r.locality for r in loaded.requests)


# ---------------------------------------------------------------- hardening found by the fuzz test


@pytest.mark.parametrize("text, reason", [
    ('[{"case_id": ' + "9" * 5000 + "}]", "invalid JSON: Exceeds the limit (4300 digits)"),
    ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply"),
])
def test_json_python_cannot_parse_is_a_file_error(tmp_path, text, reason):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    assert str(raises(path)).startswith(f"{path}: {reason}")


def test_lone_surrogates_and_line_breaks_are_named_in_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    record = dict(REQUESTS[1].to_dict(), case_id="a\nb\u2028c")
    path.write_text(json.dumps(record) + "\n" + json.dumps(dict(record, case_id="x", subject="\ud800")) + "\n")
    error = raises(path)
    assert str(error) == (f"{path}: line 2: record 1 (case_id x): field 'subject': "
                          "not valid Unicode: lone surrogate at character 0")
    path.write_text(json.dumps(dict(record, target_new=3)) + "\n")
    assert str(raises(path)) == (f"{path}: line 1: record 0 (case_id a\\nb\\u2028c): field 'target_new': "
                                 "must be a string, got number")
    path.write_bytes(b'{"case_id": 1}\n{"subject": "\xff"}\n')
    error = raises(path)
    assert (error.line, str(error)) == (2, f"{path}: line 2: not UTF-8 text (invalid start byte at byte 28)")


def test_damaged_parquet_that_makes_polars_panic(tmp_path):
    path = tmp_path / "r.parquet"
    pl.DataFrame([r.to_dict() for r in REQUESTS] * 2).write_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[:200] + bytes(16) + data[216:])
    assert str(raises(path)).startswith(f"{path}: cannot read Parquet")


def test_context_limit_of_llama_and_gpt2_configs():
    from transformers import GPT2Config, LlamaConfig

    assert context_limit(LlamaConfig(max_position_embeddings=64)) == 64
    assert context_limit(GPT2Config(n_positions=32)) == 32


def test_check_context_names_record_field_and_limit(tmp_path):
    from kdpo.world.build import build_tokenizer

    tokenizer = build_tokenizer([r.prompt + " " + r.target_new for r in REQUESTS])
    check_context(REQUESTS, tokenizer, 64, "edits.jsonl")  # everything fits
    long_locality = PromptAnswer("word " * 80, "x")
    cases = [
        (replace(REQUESTS[1], prompt="word " * 80), "prompt"),  # the prompt alone is too long
        (replace(REQUESTS[1], target_new="word " * 80), "target_new"),  # the prompt fits, not with its answer
        (replace(REQUESTS[1], ground_truth="word " * 80), "ground_truth"),
        (replace(REQUESTS[1], rephrase_prompts=("ok", "word " * 80)), "rephrase_prompts[1]"),
        (replace(REQUESTS[0], portability=(REQUESTS[0].portability[0], long_locality)), "portability[1].prompt"),
        (replace(REQUESTS[0], locality=(PromptAnswer("ok", "word " * 80),)), "locality[0].ground_truth"),
    ]
    for request, field in cases:
        with pytest.raises(EditDataError) as error:
            check_context([REQUESTS[0], request], tokenizer, 64, "edits.jsonl")
        assert (error.value.index, error.value.case_id, error.value.field) == (1, request.case_id, field)
        assert str(error.value).startswith(f"edits.jsonl: record 1 (case_id {request.case_id}): field '{field}': ")
        assert str(error.value).endswith("over the model's context of 64 positions")
    check_context([cases[0][0]], tokenizer, None)  # no limit known: nothing to check
