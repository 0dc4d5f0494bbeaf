"""The knowledge-refresh flow end to end on the tiny world: MLflow runs, metrics, registry aliases,
Prefect's cache of the world build and the baseline probe."""
import json
import logging
import shutil
from pathlib import Path

import mlflow
import pytest
from conftest import TINY_WORLD
from gates import RELAXED
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from flows.knowledge_refresh import DEFAULT_GATES, RefreshInputError, knowledge_refresh
from kdpo.evaluation import score_pairs
from kdpo.loaders import write_jsonl
from kdpo.memory import EditMemory
from kdpo.modeling import load_model
from kdpo.world import WorldConfig, cache_root, recall_shortfall
import tasks.caching
from tasks.caching import directory_digest, probe_cache_key, refresh_work_dir
from tasks.refresh import DataGateError, evaluate_refresh, register_model
from tasks.world import build_world_task



@pytest.fixture(autouse=True)
def kdpo_home(tmp_path, monkeypatch):
    """Refresh work directories (checkpoints) and cached worlds live in the test's folder."""
    monkeypatch.setenv("KDPO_HOME", str(tmp_path / "kdpo-home"))
    return tmp_path / "kdpo-home"


@pytest.fixture
def prefect_results(tmp_path):
    """Prefect's persisted task results (its cache) in the test's folder, so a first run is never a hit."""
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        yield


@pytest.fixture
def tracking(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


def task_states(tracking: str, run_id: str) -> dict[str, str]:
    """Task name -> final state name of the Prefect flow run behind an MLflow parent run."""
    flow_run_id = MlflowClient(tracking).get_run(run_id).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def flow_run_logs(tracking: str, run_id: str) -> list[str]:
    """The messages the Prefect flow run behind an MLflow parent run logged (its tasks' included)."""
    APILogHandler().flush()
    flow_run_id = MlflowClient(tracking).get_run(run_id).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_refresh_tracks_every_step_and_registers(tiny_world, tiny_requests, tracking, tmp_path):
    task_logger = logging.getLogger("prefect.task_runs")
    level, _ = task_logger.level, task_logger.setLevel(logging.INFO)  # the suite runs Prefect at WARNING
    try:
        result = knowledge_refresh(model=str(tiny_world.path), limit=3, tracking_uri=tracking, artifact_root=str(tmp_path / 'artifacts'), model_name="tiny",
                                   settings={"max_steps": 150}, gates=RELAXED, log_every=2)
    finally:
        task_logger.setLevel(level)
    progress = [m for m in flow_run_logs(tracking, result["run_id"]) if m.startswith("edit ")]
    assert [m.split(" (")[0] for m in progress] == ["edit 2/3", "edit 3/3"]
    assert all("running edit success" in m for m in progress)
    client = MlflowClient(tracking)
    parent = client.get_run(result["run_id"])
    assert parent.data.tags["prefect.flow_run_id"] and parent.data.tags["kdpo.model_version"] == result["version"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["kdpo.step"] for c in children} == {"validate", "probe", "edit", "evaluate", "register"}
    edit_run = next(c for c in children if c.data.tags["kdpo.step"] == "edit")
    history = client.get_metric_history(edit_run.info.run_id, "edit/immediate/edit_success")
    assert [m.step for m in history] == [0, 1, 2]
    assert edit_run.data.params["method"] == "kdpo"
    assert str(client.get_model_version_by_alias("tiny", "challenger").version) == result["version"]
    assert result["promoted"], result["gates"]
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == result["version"]
    answers = mlflow.pyfunc.load_model("models:/tiny@champion").predict([r.prompt for r in tiny_requests[:3]])
    assert answers == [r.target_new for r in tiny_requests[:3]]  # the edited facts, nothing after them


def test_failing_gate_leaves_champion_where_it_was(tiny_world, tiny_requests, tracking, tmp_path):
    first = knowledge_refresh(model=str(tiny_world.path), limit=2, tracking_uri=tracking, artifact_root=str(tmp_path / 'artifacts'), model_name="gated",
                              settings={"max_steps": 150}, gates=RELAXED)
    # no model given: the refresh starts from models:/gated@champion, the first refresh's edited model
    second = knowledge_refresh(edits_path=str(tiny_world.edits_path), limit=2, tracking_uri=tracking,
                               artifact_root=str(tmp_path / 'artifacts'), model_name="gated",
                               gates={"min_edit_success": 1.01})
    client = MlflowClient(tracking)
    params = client.get_run(second["run_id"]).data.params
    champion = Path(params["model"])  # the first refresh's edited model carries what `kdpo edit --save` writes
    assert champion != tiny_world.path and (champion / "edit_memory.safetensors").exists()
    assert (champion / "corpus.txt").read_text() == (tiny_world.path / "corpus.txt").read_text() + "".join(
        f"{r.prompt} {r.target_new}.\n" for r in tiny_requests[:2])
    assert (champion / "edits.jsonl").read_text() == tiny_world.edits_path.read_text()
    assert params["started_from_champion"] == first["version"]
    assert not second["promoted"]
    assert client.get_model_version("gated", second["version"]).tags["rejected"].startswith("edit_success ")
    assert str(client.get_model_version_by_alias("gated", "champion").version) == first["version"]
    assert str(client.get_model_version_by_alias("gated", "challenger").version) == second["version"]


def test_invalid_data_stops_before_any_edit(tiny_world, tiny_requests, tracking, tmp_path, kdpo_home):
    bad = tmp_path / "bad.jsonl"
    broken = tiny_requests[0].to_dict() | {"target_new": tiny_requests[0].ground_truth}
    write_jsonl(tiny_requests[1:3], bad)
    with bad.open("a") as handle:
        handle.write(json.dumps(broken) + "\n")
    with pytest.raises(DataGateError, match="record 2"):
        knowledge_refresh(edits_path=str(bad), model=str(tiny_world.path), tracking_uri=tracking, artifact_root=str(tmp_path / 'artifacts'), model_name="never")
    client = MlflowClient(tracking)
    assert client.search_registered_models("name = 'never'") == []
    runs = client.search_runs([client.get_experiment_by_name("knowledge-refresh").experiment_id])
    assert {run.info.status for run in runs} == {"FAILED"}  # the parent and its validate step
    assert not list((kdpo_home / "refreshes").iterdir())  # nothing to resume: its work folder is gone


def test_quarantine_edits_only_the_good_records(tiny_world, tiny_requests, tracking, tmp_path):
    edits = tmp_path / "mixed.jsonl"
    write_jsonl(tiny_requests[:2], edits)
    with edits.open("a") as handle:
        handle.write(json.dumps(tiny_requests[2].to_dict() | {"target_new": tiny_requests[2].ground_truth}) + "\n")
    result = knowledge_refresh(edits_path=str(edits), model=str(tiny_world.path), tracking_uri=tracking,
                               artifact_root=str(tmp_path / "artifacts"), model_name="quarantined", quarantine=True,
                               settings={"max_steps": 150}, gates=RELAXED)
    assert result["summary"]["edits"] == 2
    client = MlflowClient(tracking)
    children = client.search_runs([client.get_run(result["run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result['run_id']}'")
    validate = next(c for c in children if c.data.tags["kdpo.step"] == "validate")
    assert validate.data.metrics["validate/bad_records"] == 1
    assert "validation/quarantine.jsonl" in [a.path for a in client.list_artifacts(validate.info.run_id, "validation")]


def test_baseline_probe_is_cached_by_model_and_requests(tiny_world, tiny_requests, tracking, tmp_path, prefect_results):
    runs = [
        knowledge_refresh(model=str(tiny_world.path), limit=2, tracking_uri=tracking, artifact_root=str(tmp_path / "a"),
                          model_name="cached", settings={"max_steps": 150}, gates=RELAXED)
        for _ in range(2)
    ]
    first, second = (task_states(tracking, run["run_id"]) for run in runs)
    assert first["probe-baseline"] == "Completed" and second["probe-baseline"] == "Cached"
    assert first["log-probe"] == second["log-probe"] == "Completed"  # the probe's MLflow step run either way
    assert runs[0]["summary"]["final"] == runs[1]["summary"]["final"]
    key = probe_cache_key(None, {"model_dir": str(tiny_world.path), "requests": tiny_requests[:2]})
    assert key != probe_cache_key(None, {"model_dir": str(tiny_world.path), "requests": tiny_requests[:3]})
    edited = tmp_path / "edited"
    shutil.copytree(tiny_world.path, edited)
    (edited / "model.safetensors").write_bytes((edited / "model.safetensors").read_bytes()[:-1] + b"\0")
    assert key != probe_cache_key(None, {"model_dir": str(edited), "requests": tiny_requests[:2]})


def test_world_build_has_one_cache_its_directory(tiny_world, tmp_path):
    """The task loads a built world from ``$KDPO_HOME/worlds/KEY`` (no second cache of Prefect's that could name
    a directory since removed), builds one with other inputs, and builds again a world whose directory is gone."""
    config = WorldConfig(**TINY_WORLD)
    world_dir = cache_root() / tiny_world.info["key"]
    shutil.copytree(tiny_world.path, world_dir)  # built already

    @flow
    def build(config: WorldConfig) -> tuple[Path, bool]:
        world = build_world_task(config)
        return world.path, world.info["cached"]

    assert build(config) == (world_dir, True)
    other = WorldConfig(**TINY_WORLD | {"seed": 1, "max_epochs": 1})
    other_dir, cached = build(other)
    assert other_dir != world_dir and not cached and build(other) == (other_dir, True)
    shutil.rmtree(other_dir)
    assert build(other) == (other_dir, False)


def test_a_model_directory_is_hashed_once_while_it_is_unchanged(tiny_world, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_world.path, model)
    reads = []
    real_update = tasks.caching._update_with_file
    monkeypatch.setattr(tasks.caching, "_update_with_file", lambda digest, path: (reads.append(path),
                                                                                  real_update(digest, path)))
    first = directory_digest(model)
    files_read = len(reads)
    assert files_read == len([p for p in model.rglob("*") if p.is_file()])
    assert directory_digest(model) == first
    assert probe_cache_key(None, {"model_dir": str(model), "requests": []}).startswith(f"probe-{first[:16]}")
    assert len(reads) == files_read  # the second digest and the probe's key read no file
    with (model / "model.safetensors").open("ab") as weights:  # a changed size: seen on any file system
        weights.write(b"\0")
    assert directory_digest(model) != first and len(reads) == 2 * files_read


def test_refresh_work_dir_is_keyed_by_the_refresh_inputs(tiny_world, kdpo_home):
    edits, model = str(tiny_world.edits_path), str(tiny_world.path)
    work_dir = refresh_work_dir(edits, model, "kdpo", None, 5, False)
    assert work_dir.parent == kdpo_home / "refreshes" and work_dir.is_dir()
    assert refresh_work_dir(edits, model, "kdpo", None, 5, False) == work_dir
    others = [refresh_work_dir(edits, model, "ft-m", None, 5, False), refresh_work_dir(edits, model, "kdpo", {"memory.lr": 1e-3}, 5, False),
              refresh_work_dir(edits, model, "kdpo", None, 6, False)]
    assert len({work_dir, *others}) == 4


def test_chained_refresh_adds_to_the_champions_memory_and_reverts(tiny_world, tiny_requests, tracking, tmp_path):
    first_edits, second_edits = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    write_jsonl(tiny_requests[:2], first_edits)
    write_jsonl(tiny_requests[2:4], second_edits)
    common = {"tracking_uri": tracking, "artifact_root": str(tmp_path / "artifacts"), "model_name": "chained",
              "settings": {"max_steps": 150}, "gates": RELAXED}
    knowledge_refresh(edits_path=str(first_edits), model=str(tiny_world.path), **common)
    knowledge_refresh(edits_path=str(second_edits), **common)  # starts from the first refresh's champion

    def champion_facts():
        model = mlflow.pyfunc.load_model("models:/chained@champion").unwrap_python_model().model
        return model, sorted(f.case_id for slot in EditMemory.of(model).slots for f in slot.facts)

    model, facts = champion_facts()
    assert facts == sorted(r.case_id for r in tiny_requests[:4])  # the pyfunc answers with all four edits
    client = MlflowClient(tracking)
    versions = {alias: str(client.get_model_version_by_alias("chained", alias).version)
                for alias in ("champion", "previous-champion")}
    assert versions == {"champion": "2", "previous-champion": "1"}
    tokenizer = load_model(tiny_world.path)[1]
    assert score_pairs(model, tokenizer, [(r.prompt, r.target_new) for r in tiny_requests[:4]])[0] == [1.0] * 4
    knowledge_refresh(edits_path=str(second_edits), revert=[tiny_requests[0].case_id], **common)
    assert champion_facts()[1] == sorted(r.case_id for r in tiny_requests[1:4])


@pytest.fixture(scope="module")
def passing_summary(tiny_world, tmp_path_factory):
    """The summary of a real refresh of the tiny world that passes every gate of RELAXED."""
    folder = tmp_path_factory.mktemp("gates")
    result = knowledge_refresh(model=str(tiny_world.path), limit=2, tracking_uri=f"sqlite:///{folder / 'mlruns.db'}",
                               artifact_root=str(folder / "artifacts"), model_name="gates",
                               settings={"max_steps": 150}, gates=RELAXED)
    assert result["promoted"], result["gates"]
    return result["summary"]


@pytest.mark.parametrize("gate", sorted(DEFAULT_GATES))
def test_each_gate_alone_keeps_the_champion(gate, passing_summary, tiny_world, tracking):
    """Only ``gate`` made impossible: only its check fails, the version is rejected naming it, and the
    champion stays."""
    mlflow.set_experiment("gates")
    parents = []
    for name in ("champion", "challenger"):
        with mlflow.start_run(run_name=name) as run:
            parents.append(run.info.run_id)
    register_model(str(tiny_world.path), parents[0], "gated", {"passed": True, "rejected": ""},
                   "the champion", "champion-key")
    gates = DEFAULT_GATES | RELAXED | {gate: -1e9 if gate.startswith("max_") else 1.01}
    decision = evaluate_refresh(passing_summary, parents[1], gates)
    metric = "fluency" if gate == "max_fluency_drop" else gate.removeprefix("min_")
    assert {name for name, ok in decision["checks"].items() if not ok} == {metric}
    registration = register_model(str(tiny_world.path), parents[1], "gated", decision,
                                  "the challenger", "challenger-key")
    client = MlflowClient(tracking)
    assert not registration["promoted"] and str(client.get_model_version_by_alias("gated", "champion").version) == "1"
    rejected = client.get_model_version("gated", registration["version"]).tags["rejected"]
    assert f" fails {gate} " in rejected and ";" not in rejected


def test_a_world_that_missed_its_recall_bar_is_refused(tiny_world, tracking, tmp_path):
    assert recall_shortfall(tiny_world.path) is None  # the tiny world met its bar
    weak = tmp_path / "weak-world"
    shutil.copytree(tiny_world.path, weak)
    info = json.loads((weak / "world.json").read_text())
    info["recall"]["main"], info["recall_met"] = 0.5, False
    (weak / "world.json").write_text(json.dumps(info))
    with pytest.raises(RefreshInputError, match=r"missed its recall bar 0\.97 .*main 0\.500.*--allow-weak-world"):
        knowledge_refresh(model=str(weak), limit=1, tracking_uri=tracking, model_name="weak")
    assert not MlflowClient(tracking).search_registered_models()  # refused before any run or registration


def test_flow_parameters_are_typed_for_the_prefect_form():
    """The Prefect UI builds its run form from these: the method is a choice, the gates a typed block."""
    from prefect.utilities.callables import parameter_schema

    from flows.inbox import refresh_inbox
    from kdpo.editors import EDITORS

    for refresh in (knowledge_refresh, refresh_inbox):
        schema = parameter_schema(refresh.fn).model_dump()
        assert sorted(schema["properties"]["method"]["enum"]) == sorted(EDITORS)
        gates = schema["definitions"]["Gates"]
        assert {name: field["default"] for name, field in gates["properties"].items()} == DEFAULT_GATES
        assert gates["additionalProperties"] is False  # a misspelt gate is refused, not ignored
