"""prefect.yaml and MLproject point at real entrypoints; the inbox flow archives or fails each file."""
import importlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from prefect import Flow
from prefect.client.schemas.schedules import CronSchedule

from gates import RELAXED
from flows.inbox import InboxFailed, refresh_inbox
from kdpo.loaders import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_deployments_point_at_real_flows():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {d["name"] for d in config["deployments"]}
    assert {"knowledge-refresh", "evaluate-champion"} <= names
    for deployment in config["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        assert (ROOT / path).exists(), path
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, function), Flow), deployment["entrypoint"]
        for schedule in deployment.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))  # raises if invalid
    refresh = next(d for d in config["deployments"] if d["name"] == "knowledge-refresh")
    assert refresh["schedules"] and refresh["parameters"]["inbox"] == "inbox"


def test_deployments_run_on_any_machine(monkeypatch):
    """Job environment from the deploying shell, the checkout from the worker's KDPO_PROJECT_DIR, one refresh at a
    time (the full recipe runs for real in tests/test_postgres.py)."""
    from prefect.utilities.templating import apply_values

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert "$PWD" not in (ROOT / "prefect.yaml").read_text().split("\nname:", 1)[1]  # no deploying machine's path
    [[step, inputs]] = [next(iter(s.items())) for s in config["pull"]]
    assert step == "prefect.deployments.steps.set_working_directory"
    monkeypatch.setenv("KDPO_PROJECT_DIR", "/srv/kdpo-refresh")
    assert apply_values(inputs, {}) == {"directory": "/srv/kdpo-refresh"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("KDPO_HOME", "/var/cache/kdpo")
    for deployment in config["deployments"]:
        env = apply_values(deployment["work_pool"]["job_variables"]["env"], {})
        assert env == {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "KDPO_HOME": "/var/cache/kdpo"}
    refresh = next(d for d in config["deployments"] if d["name"] == "knowledge-refresh")
    assert refresh["concurrency_limit"] == 1
    [[step, inputs]] = [next(iter(s.items())) for s in config["build"]]  # refuses an empty job environment
    assert step == "prefect.deployments.steps.run_shell_script" and inputs["shell"]
    check = inputs["script"]
    for missing in ("MLFLOW_TRACKING_URI", "KDPO_HOME"):
        env = {"PATH": os.environ["PATH"], "MLFLOW_TRACKING_URI": "http://m:5000", "KDPO_HOME": "/k"}
        assert subprocess.run(["sh", "-c", check], env=env).returncode == 0
        env.pop(missing)
        done = subprocess.run(["sh", "-c", check], env=env, capture_output=True, text=True)
        assert done.returncode == 1 and f"export {missing}" in done.stderr


def test_mlproject_entry_points_exist():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert {"refresh", "world", "evaluate", "benchmark"} <= set(project["entry_points"])
    for name, entry in project["entry_points"].items():
        command = entry["command"]
        if command.startswith("python -m "):
            importlib.import_module(command.split()[2])
        for parameter in entry.get("parameters", {}):
            assert "{" + parameter + "}" in command, (name, parameter)


def test_inbox_archives_good_files_and_fails_bad_ones(tiny_world, tiny_requests, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_jsonl(tiny_requests[:2], inbox / "a-good.jsonl")
    (inbox / "b-bad.jsonl").write_text(json.dumps(tiny_requests[0].to_dict() | {"prompt": "no subject here"}) + "\n")
    (inbox / "notes.txt").write_text("not an edit file")
    with pytest.raises(InboxFailed, match=r"^1 inbox file\(s\) failed: .*b-bad") as failed:  # the flow run ends Failed
        refresh_inbox(
            inbox=str(inbox), archive=str(tmp_path / "archive"), failed=str(tmp_path / "failed"),
            model=str(tiny_world.path), tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
            artifact_root=str(tmp_path / "artifacts"), model_name="inbox", settings={"max_steps": 150},
            gates=RELAXED,
        )
    outcome = failed.value.outcome
    assert [Path(p).name.split("-", 1)[1] for p in outcome["archived"]] == ["a-good.jsonl"]
    assert len(outcome["failed"]) == 1 and Path(outcome["failed"][0]).name.endswith("b-bad.jsonl")
    report = Path(outcome["failed"][0] + ".error.txt").read_text()
    assert "DataGateError" in report and "subject appears in prompt" in report
    assert sorted(p.name for p in inbox.iterdir()) == ["notes.txt"]  # nothing processed is left behind


def test_evaluate_champion_scores_the_registered_champion(tiny_world, tmp_path):
    from flows.evaluate_champion import evaluate_champion
    from flows.knowledge_refresh import knowledge_refresh

    tracking = f"sqlite:///{tmp_path / 'mlruns.db'}"
    knowledge_refresh(model=str(tiny_world.path), limit=2, tracking_uri=tracking, model_name="scored",
                      artifact_root=str(tmp_path / "artifacts"), settings={"max_steps": 150},
                      gates=RELAXED)
    scores = evaluate_champion(baseline_model=str(tiny_world.path), model_name="scored", tracking_uri=tracking,
                               limit=2)
    assert scores["after"]["edit_success"] == 1.0 > scores["before"]["edit_success"]
