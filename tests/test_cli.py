"""The ``kdpo`` CLI end to end on the tiny world, and its one-line errors for user mistakes."""
import json

import pytest

from conftest import TINY_WORLD
from kdpo.cli import main
from kdpo.loaders import write_jsonl


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for command in ("world", "probe", "edit", "memory", "evaluate"):
        assert command in out


def test_world_build_then_cached(tmp_path, capsys):
    settings = [arg for key, value in TINY_WORLD.items() for arg in ("--set", f"{key}={value}")]
    settings = [s.replace("max_epochs=60", "max_epochs=10") for s in settings]
    code, out, _ = run(capsys, "world", "build", "--out", tmp_path / "w", *settings)
    assert code == 0 and "recall" in out and "edits.jsonl" in out
    code, out, _ = run(capsys, "world", "build", "--out", tmp_path / "w", *settings, "--json")
    info = json.loads(out)
    assert code == 0 and info["cached"] is True and info["parameters"] > 0
    assert (tmp_path / "w" / "model.safetensors").exists() and (tmp_path / "w" / "tokenizer.json").exists()


def test_probe_edit_evaluate(tiny_world, tmp_path, capsys):
    code, out, _ = run(capsys, "probe", "--model", tiny_world.path, "--limit", 3, "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 3 and {"answers_now", "target_new", "ground_truth"} <= set(rows[0])

    code, out, _ = run(capsys, "edit", "--model", tiny_world.path, "--n", 3, "--method", "kdpo",
                       "--save", tmp_path / "edited", "--output", tmp_path / "result.json")
    assert code == 0 and "immediate" in out and "final" in out and "schedule:" in out
    assert len(json.loads((tmp_path / "result.json").read_text())["records"]) == 3

    code, out, _ = run(capsys, "evaluate", "--model", tmp_path / "edited", "--baseline-model", tiny_world.path,
                       "--edits", tiny_world.edits_path, "--limit", 3, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["after"]["edit_success"] > summary["before"]["edit_success"]


def test_edit_json_with_settings(tiny_world, capsys):
    code, out, _ = run(capsys, "edit", "--model", tiny_world.path, "--n", 2, "--method", "ft-m",
                       "--set", "protection=none", "--set", "lr=1e-3", "--json")
    document = json.loads(out)
    assert code == 0 and document["config"]["lr"] == 1e-3 and document["summary"]["edits"] == 2


def test_memory_list_and_remove(tiny_world, tmp_path, capsys):
    edited = tmp_path / "edited"
    code, out, _ = run(capsys, "edit", "--model", tiny_world.path, "--n", 2, "--set", "max_steps=150", "--save", edited,
                       "--json")
    assert code == 0 and json.loads(out)["summary"]["memory"]["facts"] == 2
    assert (edited / "edit_memory.safetensors").exists()
    code, out, _ = run(capsys, "memory", "list", "--model", edited, "--json")
    facts = json.loads(out)["facts"]
    assert code == 0 and len(facts) == 2
    code, out, _ = run(capsys, "memory", "remove", facts[0]["case_id"], "--model", edited)
    assert code == 0 and facts[0]["case_id"] in out
    code, out, _ = run(capsys, "memory", "list", "--model", edited, "--json")
    assert [f["case_id"] for f in json.loads(out)["facts"]] == [facts[1]["case_id"]]
    code, _, err = run(capsys, "memory", "remove", "no-such-case", "--model", edited)
    assert code == 2 and "no-such-case" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "memory", "list", "--model", tiny_world.path)
    assert code == 2 and "no edit memory" in err


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "edits.json"),
        ('[{"case_id": 7, "prompt": "p", "target_new": "", "subject": "s", "ground_truth": "g", '
         '"rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "a"}]', "case_id 7"),
    ],
)
def test_bad_edit_file_is_one_line_error(tiny_world, tmp_path, capsys, content, message):
    path = tmp_path / "edits.json"
    path.write_text(content)
    code, _, err = run(capsys, "probe", "--model", tiny_world.path, "--edits", path)
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_skip_invalid_lists_what_it_skipped(tiny_world, tiny_requests, tmp_path, capsys):
    path = tmp_path / "edits.jsonl"
    write_jsonl(tiny_requests[:2], path)
    with path.open("a") as handle:
        handle.write(json.dumps({**tiny_requests[2].to_dict(), "target_new": "  "}) + "\n")
    code, out, err = run(capsys, "probe", "--model", tiny_world.path, "--edits", path, "--skip-invalid", "--json")
    assert code == 0 and len(json.loads(out)) == 2
    assert "record 2" in err and "target_new" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["edit", "--set", "nonsense"], "KEY=VALUE"),
        (["edit", "--set", "lr=abc"], "expects float"),
        (["probe", "--edits", "/nonexistent/edits.jsonl"], "/nonexistent/edits.jsonl"),
        (["edit", "--protection-corpus", "/nonexistent/corpus.txt"], "corpus"),
    ],
)
def test_user_mistakes_are_one_line_errors(tiny_world, capsys, argv, message):
    code, _, err = run(capsys, *argv, "--model", tiny_world.path)
    assert code == 2 and message in err and "Traceback" not in err


def test_edit_in_bfloat16_with_a_config_file(tiny_world, tmp_path, capsys):
    config = tmp_path / "kdpo.yaml"
    config.write_text("lr: 0.02\nmax_steps: 60\nmodules: [layers.1.mlp.down_proj]\n")
    code, out, _ = run(capsys, "edit", "--model", tiny_world.path, "--n", 2, "--dtype", "bfloat16",
                       "--config", config, "--set", "max_steps=80", "--json")
    document = json.loads(out)
    assert code == 0 and document["config"]["lr"] == 0.02 and document["config"]["max_steps"] == 80
    assert document["config"]["modules"] == ["layers.1.mlp.down_proj"]
