"""The Great Expectations gate on edit requests: clean data passes, each bad record is named."""
import json

import polars as pl
import pytest

from data_checks import CHECKS, CheckLimits, requests_frame, split_valid, validate_requests
from data_checks.edit_requests import REQUIRED_FIELDS
from kdpo.loaders import EditDataError, load_requests
from kdpo.requests import EditRequest, PromptAnswer


def req(case_id, subject, prompt, target, ground_truth=None, locality=()):
    return EditRequest(case_id=case_id, subject=subject, prompt=prompt, target_new=target,
                       ground_truth=ground_truth, rephrase_prompts=(f"Say: {prompt}",),
                       locality=tuple(PromptAnswer(p, "x") for p in locality))


CLEAN = [
    req("c0", "Eiffel Tower", "The Eiffel Tower is located in", "Rome", "Paris",
        locality=["The Louvre is located in"]),
    req("c1", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English",
        "French"),
    req("c2", "Toko Yasuda", "Toko Yasuda plays the", "piano", "guitar",
        locality=["Jimi Hendrix plays the"]),
    req("c3", "Oslo", "Oslo is the capital of", "Sweden"),  # no ground truth: allowed
    # the same edit twice (same prompt, same target) is a duplicate but not a conflict
    req("c4", "Rome", "Rome is in", "Spain", "Italy"),
    req("c5", "Rome", "Rome is in", "spain "),
]

# name -> (bad request appended after CLEAN, the check it must fail)
BAD_CASES = {
    "target_equals_ground_truth": (req("b", "Berlin", "Berlin is in", "Germany", " germany"),
                                   "target_differs"),
    "subject_not_in_prompt": (req("b", "Bob Dylan", "Alice plays the", "drums"),
                              "subject_in_prompt"),
    "conflicting_duplicate": (req("b", "Toko Yasuda", "Toko Yasuda plays the", "violin"),
                              "no_conflicting_duplicate"),
    "over_long_prompt": (req("b", "Bob", "Bob " + "x" * 600, "y"), "prompt_length"),
    "locality_is_edited_prompt": (req("b", "Ann", "Ann lives in", "Lima",
                                      locality=["Oslo is the capital of"]),
                                  "locality_not_edited"),
    "duplicate_case_id": (req("c1", "Ann", "Ann lives in", "Lima"), "case_id_unique"),
    "empty_subject": (req("b", "", "Ann lives in", "Lima"), "subject_non_empty"),
    "null_subject": (req("b", None, "Ann lives in", "Lima"), "subject_non_empty"),
    "whitespace_target": (req("b", "Ann", "Ann lives in", "  "), "target_new_non_empty"),
}


def test_clean_requests_pass():
    report = validate_requests(CLEAN)
    assert report.success, report.to_json()
    assert report.failures == [] and report.bad_indices == set()
    assert report.statistics["n_records"] == len(CLEAN)
    assert report.statistics["unsuccessful_expectations"] == 0
    assert split_valid(CLEAN, report) == (CLEAN, [])


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_record_is_named(name):
    bad, check_key = BAD_CASES[name]
    requests = [*CLEAN, bad]
    report = validate_requests(requests)
    assert not report.success
    index = len(CLEAN)
    failure = next(f for f in report.failures if f["index"] == index)
    assert failure["case_id"] == bad.case_id
    assert CHECKS[check_key] in failure["checks"]
    if name == "duplicate_case_id":  # both holders of the case_id are reported
        assert report.bad_indices == {1, index}
    elif name == "conflicting_duplicate":  # both sides of the conflict are reported
        assert report.bad_indices == {2, index}
    else:
        assert report.bad_indices == {index}
        assert failure["checks"] == [CHECKS[check_key]]  # reported once, by that check
    assert json.loads(report.to_json())["failures"]


def test_limits_are_configurable():
    long_target = [*CLEAN, req("b", "Ann", "Ann lives in", "L" * 30)]
    assert validate_requests(long_target).success
    report = validate_requests(long_target, CheckLimits(target_max_chars=20))
    assert report.bad_indices == {len(CLEAN)}
    assert report.failures[0]["checks"] == [CHECKS["target_length"]]
    with pytest.raises(ValueError):
        CheckLimits(prompt_min_chars=5, prompt_max_chars=2)


def test_split_valid_quarantines_bad_records(tmp_path):
    bads = [BAD_CASES[name][0] for name in
            ("target_equals_ground_truth", "subject_not_in_prompt", "empty_subject")]
    requests = [bads[0], *CLEAN[:3], bads[1], *CLEAN[3:], bads[2]]
    report = validate_requests(requests, docs_dir=tmp_path / "docs")
    assert report.bad_indices == {0, 4, len(requests) - 1}
    assert [(f["index"], f["case_id"]) for f in report.failures] == [
        (0, "b"), (4, "b"), (len(requests) - 1, "b")]
    good, bad = split_valid(requests, report)
    assert good == CLEAN and bad == bads
    with pytest.raises(ValueError):
        split_valid(CLEAN, report)

    validation = json.loads((tmp_path / "docs" / "validation.json").read_text())
    assert validation["success"] is False and len(validation["results"]) == len(CHECKS) + 4
    page = (tmp_path / "docs" / "index.html").read_text()
    assert "FAILED" in page and CHECKS["subject_in_prompt"] in page and "http" not in page


def test_frame_has_derived_columns():
    frame = requests_frame([*CLEAN, BAD_CASES["locality_is_edited_prompt"][0]])
    assert frame.height == len(CLEAN) + 1
    assert frame["locality_prompts"].to_list()[0] == ["The Louvre is located in"]
    assert frame["n_rephrases"].to_list() == [1] * frame.height
    assert frame["locality_among_edited"].to_list() == [False] * len(CLEAN) + [True]
    assert frame["conflicting_duplicate"].to_list() == [False] * frame.height
    assert requests_frame([]).height == 0


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_an_empty_edit_file_fails_the_gate_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        pl.DataFrame(schema={name: pl.String for name in REQUIRED_FIELDS}).write_parquet(path)
    else:
        path.write_text({".jsonl": "\n\n", ".json": "[]", ".csv": ",".join(REQUIRED_FIELDS) + "\n"}[suffix])
    requests = load_requests(path, format="json" if suffix == ".json" else "auto").requests
    assert requests == []
    with pytest.raises(EditDataError) as error:
        validate_requests(requests, source=path)
    assert str(error.value) == f"{path}: no edit requests: an empty edit file fails the data gate"


def test_repeated_records_are_all_reported():
    report = validate_requests(CLEAN * 50)  # 300 records: every case_id and prompt repeated
    assert not report.success and report.bad_indices == set(range(300))
