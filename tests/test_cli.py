"""The ``kdpo`` CLI end to end on the tiny world, and its one-line errors for user mistakes.

Errors are checked on ``kdpo`` run as a real process: its exit status, and a stderr of one line without a
traceback. Most mistakes are found before torch is imported, so those processes take a fraction of a second.
"""
import json
import subprocess
import sys

import polars as pl
import pytest

from conftest import TINY_WORLD
from kdpo.cli import main
from kdpo.evaluation import score_pairs
from kdpo.loaders import write_jsonl
from kdpo.modeling import load_model

MICRO = {"max_facts": 40, "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "max_epochs": 2}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def kdpo(tmp_path, *argv) -> subprocess.CompletedProcess:
    """``kdpo ARGV`` as a process, in ``tmp_path`` with its own ``KDPO_HOME``."""
    env = {"PATH": "/usr/bin:/bin", "KDPO_HOME": str(tmp_path / "kdpo-home"), "OMP_NUM_THREADS": "1",
           "RUST_BACKTRACE": "0"}
    return subprocess.run([sys.executable, "-m", "kdpo.cli", *map(str, argv)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Assert exit status 2 and a one-line stderr naming ``words``; the line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert all(word in result.stderr for word in words), (words, result.stderr)
    return result.stderr.strip()


def settings(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for command in ("world", "probe", "edit", "memory", "evaluate"):
        assert command in out


def test_world_build_then_cached(tmp_path, capsys):
    world_settings = settings(TINY_WORLD | {"max_epochs": 10})
    code, out, _ = run(capsys, "world", "build", "--out", tmp_path / "w", *world_settings)
    assert code == 0 and "recall" in out and "edits.jsonl" in out
    code, out, _ = run(capsys, "world", "build", "--out", tmp_path / "w", *world_settings, "--json")
    info = json.loads(out)
    assert code == 0 and info["cached"] is True and info["config"]["max_epochs"] == 10
    assert info["epochs"] <= 10 and info["edits"] == len((tmp_path / "w" / "edits.jsonl").read_text().splitlines())
    assert (tmp_path / "w" / "model.safetensors").exists() and (tmp_path / "w" / "tokenizer.json").exists()


def test_world_build_from_a_file_with_an_empty_target(tmp_path, tiny_requests):
    path = tmp_path / "edits.jsonl"
    write_jsonl(tiny_requests[:4], path)
    records = path.read_text().splitlines()
    records[2] = json.dumps({**json.loads(records[2]), "target_new": ""})
    path.write_text("\n".join(records) + "\n")
    case_id = tiny_requests[2].case_id
    one_line_error(kdpo(tmp_path, "world", "build", "--from", path, "--out", tmp_path / "w", *settings(MICRO)),
                   f"{path}: line 3: record 2 (case_id {case_id}): field 'target_new': must be a non-empty string")
    assert not (tmp_path / "w").exists()

    built = kdpo(tmp_path, "world", "build", "--from", path, "--out", tmp_path / "w", *settings(MICRO),
                 "--skip-invalid", "--json")
    assert built.returncode == 0, built.stderr
    info = json.loads(built.stdout)
    assert info["edits"] == 3 and [s["index"] for s in info["skipped"]] == [2]
    assert (f"skipped: {path}: record 2 (case_id {case_id}): field 'target_new': must be a non-empty string"
            in built.stderr.splitlines())
    edits = [json.loads(line)["case_id"] for line in (tmp_path / "w" / "edits.jsonl").read_text().splitlines()]
    assert edits == [r.case_id for i, r in enumerate(tiny_requests[:4]) if i != 2]


def test_probe_edit_evaluate(tiny_world, tiny_requests, tmp_path, capsys):
    code, out, _ = run(capsys, "probe", "--model", tiny_world.path, "--limit", 3, "--json")
    rows = json.loads(out)
    assert code == 0 and [row["case_id"] for row in rows] == [r.case_id for r in tiny_requests[:3]]
    assert [row["target_new"] for row in rows] == [r.target_new for r in tiny_requests[:3]]

    edited = kdpo(tmp_path, "edit", "--model", tiny_world.path, "--n", 3, "--method", "kdpo", "--json",
                  "--save", tmp_path / "edited", "--output", tmp_path / "result.json")
    assert edited.returncode == 0, edited.stderr
    summary = json.loads(edited.stdout)["summary"]
    result = json.loads((tmp_path / "result.json").read_text())
    assert summary["edits"] == 3 and [r["case_id"] for r in result["records"]] == [r.case_id for r in tiny_requests[:3]]
    final = [s["edit_success"] for s in result["final"]]
    assert summary["final"]["edit_success"] == pytest.approx(sum(final) / 3) and sum(final) >= 2

    # the saved model answers with the edits the result says held, and evaluate measures what edit reported
    model, tokenizer = load_model(tmp_path / "edited")
    accuracies, _ = score_pairs(model, tokenizer, [(r.prompt, r.target_new) for r in tiny_requests[:3]])
    assert accuracies == pytest.approx(final)
    code, out, _ = run(capsys, "evaluate", "--model", tmp_path / "edited", "--baseline-model", tiny_world.path,
                       "--edits", tiny_world.edits_path, "--limit", 3, "--json")
    scores = json.loads(out)
    assert code == 0 and scores["after"]["edit_success"] == pytest.approx(summary["final"]["edit_success"])
    assert scores["before"]["edit_success"] == pytest.approx(sum(row["target_new_accuracy"] for row in rows) / 3)


def test_edit_json_with_settings(tiny_world, capsys):
    code, out, _ = run(capsys, "edit", "--model", tiny_world.path, "--n", 2, "--method", "ft-m",
                       "--set", "protection=none", "--set", "weights.lr=1e-3", "--json")
    document = json.loads(out)
    assert code == 0 and document["config"]["weights"]["lr"] == 1e-3 and document["summary"]["edits"] == 2


def test_memory_list_and_remove(tiny_world, tiny_requests, tmp_path, capsys):
    edited = tmp_path / "edited"
    code, out, _ = run(capsys, "edit", "--model", tiny_world.path, "--n", 2, "--set", "max_steps=150", "--save", edited,
                       "--json")
    assert code == 0 and json.loads(out)["summary"]["memory"]["facts"] == 2
    assert (edited / "edit_memory.safetensors").exists()
    # the saved model carries its edits and its corpus, the new facts appended, as the pipeline's does
    corpus = (tiny_world.path / "corpus.txt").read_text() + "".join(
        f"{r.prompt} {r.target_new}.\n" for r in tiny_requests[:2])
    assert (edited / "corpus.txt").read_text() == corpus
    assert (edited / "edits.jsonl").read_text() == tiny_world.edits_path.read_text()
    # so it is edited again with default settings (its own edits, its memory trained on its corpus)
    code, out, _ = run(capsys, "edit", "--model", edited, "--n", 3, "--json")
    assert code == 0 and json.loads(out)["summary"]["memory"]["facts"] == 3
    code, out, _ = run(capsys, "memory", "list", "--model", edited, "--json")
    facts = json.loads(out)["facts"]
    assert code == 0 and len(facts) == 2
    code, out, _ = run(capsys, "memory", "remove", facts[0]["case_id"], "--model", edited)
    assert code == 0 and facts[0]["case_id"] in out
    assert (edited / "corpus.txt").read_text() == corpus and (edited / "edits.jsonl").exists()
    assert not list(tmp_path.glob(".edited.saving-*"))  # saved in place through a staging folder, then removed
    code, out, _ = run(capsys, "memory", "list", "--model", edited, "--json")
    assert [f["case_id"] for f in json.loads(out)["facts"]] == [facts[1]["case_id"]]
    code, _, err = run(capsys, "memory", "remove", "no-such-case", "--model", edited)
    assert code == 2 and "no-such-case" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "memory", "list", "--model", tiny_world.path)
    assert code == 2 and "no edit memory" in err


GOOD = {"case_id": 1, "subject": "Ann", "prompt": "Ann lives in", "target_new": "Lima"}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("edits.json", "{not json", "edits.json: line 1: invalid JSON"),
        ("edits.json", '[{"case_id": 7, "prompt": "p", "target_new": "", "subject": "s", "ground_truth": "g", '
         '"rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "a"}]',
         "record 0 (case_id 7): field 'target_new'"),
        ("edits.jsonl", "", "edits.jsonl: no valid edit requests"),
        ("edits.csv", "case_id,subject,prompt,target_new\n", "edits.csv: no valid edit requests"),
        ("edits.parquet", None, "edits.parquet: no valid edit requests"),
        ("edits.json", "[]", "edits.json: empty JSON array"),
        # broken after the records --n 1 keeps: the whole file is still checked
        ("edits.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n{oops\n", "line 3: record 2: invalid JSON"),
        ("edits.jsonl", json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "case_id": "a\nb", "subject": 3}) + "\n",
         "record 1 (case_id a\\nb): field 'subject': must be a string, got number"),
    ],
)
def test_bad_edit_file_is_one_line_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        pl.DataFrame(schema={key: pl.String for key in GOOD}).write_parquet(path)
    else:
        path.write_text(content)
    # the edit file is read before any model: a mistake in it is reported at once
    one_line_error(kdpo(tmp_path, "probe", "--model", tmp_path / "no-model", "--edits", path, "--n", 1), message)


def test_skip_invalid_lists_what_it_skipped(tiny_world, tiny_requests, tmp_path, capsys):
    path = tmp_path / "edits.jsonl"
    write_jsonl(tiny_requests[:2], path)
    with path.open("a") as handle:
        handle.write(json.dumps({**tiny_requests[2].to_dict(), "target_new": "  "}) + "\n")
    code, out, err = run(capsys, "probe", "--model", tiny_world.path, "--edits", path, "--skip-invalid", "--json")
    assert code == 0 and [row["case_id"] for row in json.loads(out)] == [r.case_id for r in tiny_requests[:2]]
    assert err == (f"skipped: {path}: record 2 (case_id {tiny_requests[2].case_id}): field 'target_new': "
                   "must be a non-empty string\n")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["probe", "--n", "0"], "argument --limit/--n: must be at least 1, got 0"),
        (["edit", "--n", "-5"], "argument --limit/--n: must be at least 1, got -5"),
        (["evaluate", "--baseline-model", "b", "--limit", "x"], "expected a whole number, got 'x'"),
        (["edit", "--corpus-budget", "0"], "argument --corpus-budget: must be at least 1"),
        (["report", "--compare", "--last", "0"], "argument --last: must be at least 1"),
        (["world", "build", "--skip-invalid"], "--skip-invalid needs --from FILE"),
        (["probe", "--edits", "/nonexistent/edits.jsonl"], "/nonexistent/edits.jsonl: file not found"),
        (["world", "build", "--from", "/nonexistent/edits.jsonl"], "/nonexistent/edits.jsonl: file not found"),
        (["edit", "--method", "bogus"], "argument --method: invalid choice: 'bogus'"),
        (["edit", "--set", "nonsense"], "KEY=VALUE"),
        (["edit", "--set", "memory.lr=abc"], "expects float"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, argv, message):
    one_line_error(kdpo(tmp_path, *argv), message)


def test_unwritable_outputs_are_one_line_errors(tiny_world, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line_error(kdpo(tmp_path, "edit", "--model", tiny_world.path, "--n", 1, "--save", blocker / "edited"),
                   f"--save {blocker / 'edited'}: {blocker} is a file, not a directory")
    one_line_error(kdpo(tmp_path, "world", "build", "--out", blocker / "w"), f"--out {blocker / 'w'}")
    one_line_error(kdpo(tmp_path, "report", tmp_path / "a-file", "--out", blocker), f"--out {blocker}: is a file")
    # caught only when the result is written, after the edit: the device is full
    one_line_error(kdpo(tmp_path, "edit", "--model", tiny_world.path, "--n", 1, "--set", "max_steps=5", "--json",
                        "--output", "/dev/full"), "--output /dev/full: cannot write: No space left on device")


def test_prompts_longer_than_the_context_are_refused(tiny_world, tiny_requests, tmp_path):
    path = tmp_path / "long.jsonl"
    long = tiny_requests[1].to_dict() | {"rephrase_prompts": ["word " * 400 + tiny_requests[1].prompt]}
    path.write_text("\n".join(json.dumps(r) for r in (tiny_requests[0].to_dict(), long)) + "\n")
    for command in (["probe"], ["edit", "--set", "max_steps=5"]):
        one_line_error(kdpo(tmp_path, *command, "--model", tiny_world.path, "--edits", path),
                       f"{path}: record 1 (case_id {tiny_requests[1].case_id}): field 'rephrase_prompts[0]': ",
                       "over the model's context of 128 positions")


def test_edit_in_bfloat16_with_a_config_file(tiny_world, tmp_path, capsys):
    config = tmp_path / "kdpo.yaml"
    config.write_text("max_steps: 60\nmemory:\n  lr: 0.02\n  modules: [layers.1.mlp.down_proj]\n")
    code, out, _ = run(capsys, "edit", "--model", tiny_world.path, "--n", 2, "--dtype", "bfloat16",
                       "--config", config, "--set", "max_steps=80", "--json")
    document = json.loads(out)
    assert code == 0 and document["config"]["memory"]["lr"] == 0.02 and document["config"]["max_steps"] == 80
    assert document["config"]["memory"]["modules"] == ["layers.1.mlp.down_proj"]
