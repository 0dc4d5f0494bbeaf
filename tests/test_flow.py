"""The knowledge-refresh flow end to end on the tiny world: MLflow runs, metrics, registry aliases."""
import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.knowledge_refresh import knowledge_refresh
from kdpo.loaders import write_jsonl
from tasks.refresh import DataGateError


@pytest.fixture
def tracking(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


def test_refresh_tracks_every_step_and_registers(tiny_world, tracking, tmp_path):
    result = knowledge_refresh(model=str(tiny_world.path), limit=3, tracking_uri=tracking, artifact_root=str(tmp_path / 'artifacts'), model_name="tiny",
                               settings={"max_steps": 150}, gates={"min_locality": 0.0, "max_fluency_drop": 10.0})
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
    answers = mlflow.pyfunc.load_model("models:/tiny@champion").predict(["The capital of France is"])
    assert isinstance(answers[0], str) and answers[0]


def test_failing_gate_leaves_champion_where_it_was(tiny_world, tracking, tmp_path):
    first = knowledge_refresh(model=str(tiny_world.path), limit=2, tracking_uri=tracking, artifact_root=str(tmp_path / 'artifacts'), model_name="gated",
                              settings={"max_steps": 150}, gates={"min_locality": 0.0, "max_fluency_drop": 10.0})
    # no model given: the refresh starts from models:/gated@champion, the first refresh's edited model
    second = knowledge_refresh(edits_path=str(tiny_world.edits_path), limit=2, tracking_uri=tracking,
                               artifact_root=str(tmp_path / 'artifacts'), model_name="gated",
                               gates={"min_edit_success": 1.01})
    client = MlflowClient(tracking)
    started_from = client.get_run(second["run_id"]).data.params["model"]
    assert started_from != str(tiny_world.path) and (Path(started_from) / "corpus.txt").exists()
    assert not second["promoted"]
    assert str(client.get_model_version_by_alias("gated", "champion").version) == first["version"]
    assert str(client.get_model_version_by_alias("gated", "challenger").version) == second["version"]


def test_invalid_data_stops_before_any_edit(tiny_world, tiny_requests, tracking, tmp_path):
    bad = tmp_path / "bad.jsonl"
    broken = tiny_requests[0].to_dict() | {"target_new": tiny_requests[0].ground_truth}
    write_jsonl(tiny_requests[1:3], bad)
    with bad.open("a") as handle:
        handle.write(json.dumps(broken) + "\n")
    with pytest.raises(DataGateError, match="record 2"):
        knowledge_refresh(edits_path=str(bad), model=str(tiny_world.path), tracking_uri=tracking, artifact_root=str(tmp_path / 'artifacts'), model_name="never")
    assert MlflowClient(tracking).search_registered_models("name = 'never'") == []


def test_quarantine_edits_only_the_good_records(tiny_world, tiny_requests, tracking, tmp_path):
    edits = tmp_path / "mixed.jsonl"
    write_jsonl(tiny_requests[:2], edits)
    with edits.open("a") as handle:
        handle.write(json.dumps(tiny_requests[2].to_dict() | {"target_new": tiny_requests[2].ground_truth}) + "\n")
    result = knowledge_refresh(edits_path=str(edits), model=str(tiny_world.path), tracking_uri=tracking,
                               artifact_root=str(tmp_path / "artifacts"), model_name="quarantined", quarantine=True,
                               settings={"max_steps": 150}, gates={"min_locality": 0.0, "max_fluency_drop": 10.0})
    assert result["summary"]["edits"] == 2
    client = MlflowClient(tracking)
    children = client.search_runs([client.get_run(result["run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result['run_id']}'")
    validate = next(c for c in children if c.data.tags["kdpo.step"] == "validate")
    assert validate.data.metrics["validate/bad_records"] == 1
    assert "validation/quarantine.jsonl" in [a.path for a in client.list_artifacts(validate.info.run_id, "validation")]
