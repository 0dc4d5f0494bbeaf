"""``evaluate-champion`` scores the champion's own edit history (the facts its edit memory holds, matched by case_id
to the edit files it was refreshed from), not every world edit, and logs the version it scored by its
``models:/`` URI; an explicit edit file is scored as it is."""
import json

import mlflow
import pytest
from gates import RELAXED
from mlflow.tracking import MlflowClient

from flows.evaluate_champion import evaluate_champion, history_requests, lineage_edit_files, memory_case_ids
from flows.knowledge_refresh import knowledge_refresh, starting_model
from kdpo.loaders import write_jsonl


@pytest.fixture(scope="module")
def refreshed(tiny_world, tmp_path_factory):
    """A real refresh of the tiny world's first 2 edits, promoted to champion, in the module's own stores."""
    folder = tmp_path_factory.mktemp("evaluate-champion")
    uri = f"sqlite:///{folder / 'refresh.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDPO_HOME", str(folder / "kdpo-home"))
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        refresh = knowledge_refresh(model=str(tiny_world.path), limit=2, tracking_uri=uri, model_name="held",
                                    artifact_root=str(folder / "artifacts"), settings={"max_steps": 150}, gates=RELAXED)
    assert refresh["promoted"]
    return uri, refresh


def test_scores_exactly_the_champions_own_edits_and_logs_its_version(refreshed, tiny_world, tiny_requests):
    uri, refresh = refreshed
    edited = [r.case_id for r in tiny_requests[:2]]
    outcome = evaluate_champion(baseline_model=str(tiny_world.path), model_name="held", tracking_uri=uri)
    assert len(tiny_requests) > 2 and sorted(outcome["case_ids"]) == sorted(edited)
    assert outcome["model_version"] == refresh["version"]
    assert outcome["after"]["edit_success"] == 1.0 > outcome["before"]["edit_success"]
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("evaluate-champion").experiment_id])
    model_uri = f"models:/held/{refresh['version']}"
    assert run.data.params["model_version"] == refresh["version"] == run.data.tags["kdpo.model_version"]
    assert run.data.params["model_uri"] == model_uri == run.data.tags["kdpo.model_uri"]
    assert run.data.params["requests"] == "2" and "champion" not in run.data.params  # no local path logged
    assert run.data.metrics["eval/after/edit_success"] == 1.0
    logged = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/eval/case_ids.json"))
    assert logged == {"case_ids": outcome["case_ids"]}


def test_history_comes_from_the_refresh_edit_file(refreshed, tiny_world, tiny_requests, tmp_path):
    uri, refresh = refreshed
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    assert lineage_edit_files(client, "held", refresh["version"]) == [str(tiny_world.path / "edits.jsonl")]
    champion, version = starting_model(None, "held")
    assert version == refresh["version"]
    assert sorted(memory_case_ids(champion)) == sorted(r.case_id for r in tiny_requests[:2])


def test_an_explicit_edit_file_is_scored_as_given(refreshed, tiny_world, tiny_requests, tmp_path):
    uri, refresh = refreshed
    given = tmp_path / "given.jsonl"
    write_jsonl(tiny_requests[5:8], given)
    outcome = evaluate_champion(edits_path=str(given), baseline_model=str(tiny_world.path), model_name="held",
                                tracking_uri=uri)
    assert outcome["case_ids"] == [r.case_id for r in tiny_requests[5:8]]
    assert outcome["model_version"] == refresh["version"]


def test_history_requests_take_each_case_from_the_first_file_that_has_it(tiny_requests, tmp_path):
    newer, older = tmp_path / "newer.jsonl", tmp_path / "older.jsonl"
    write_jsonl(tiny_requests[2:4], newer)
    write_jsonl(tiny_requests[:4], older)
    wanted = [tiny_requests[3].case_id, tiny_requests[0].case_id]
    found = history_requests(wanted, [str(tmp_path / "elsewhere.jsonl"), str(newer), str(older)])
    assert [r.case_id for r in found] == wanted and found[0] == tiny_requests[3]
    with pytest.raises(ValueError, match=tiny_requests[5].case_id):
        history_requests([tiny_requests[5].case_id], [str(newer), str(older)])
