"""The MLproject's world and evaluate entry points log their figures, and evaluate takes models:/ URIs."""
import mlflow
from conftest import TINY_WORLD
from mlflow.tracking import MlflowClient

from tasks.mlproject import evaluate, main
from tasks.pyfunc import log_pyfunc


def only_run(filter_string: str = "") -> mlflow.entities.Run:
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("Default").experiment_id], filter_string)
    assert len(runs) == 1
    return runs[0]


def test_world_entry_point_logs_the_build():
    main(["world", *(f"--set={k}={v}" for k, v in (TINY_WORLD | {"max_facts": 40, "max_epochs": 2}).items())])
    run = only_run()
    assert run.data.params["world/max_facts"] == "40" and run.data.tags["kdpo.world_key"]
    assert {"world/recall/main", "world/epochs", "world/seconds", "world/parameters"} <= set(run.data.metrics)
    assert run.data.metrics["world/epochs"] == 2 and 0 <= run.data.metrics["world/recall/main"] <= 1


def test_evaluate_entry_point_scores_a_registered_model(tiny_world, tiny_requests):
    with mlflow.start_run():
        version = mlflow.register_model(log_pyfunc(str(tiny_world.path)).model_uri, "tiny").version
    edits = tiny_world.path / "edits.jsonl"
    scores = evaluate(f"models:/tiny/{version}", str(tiny_world.path), str(edits))
    run = only_run("params.model LIKE 'models:/%'")
    assert run.data.params["model"] == f"models:/tiny/{version}"
    # the registered copy is the world itself: unedited, so its locality against the world is 1.0
    assert scores["after"]["locality"] == 1.0 == run.data.metrics["eval/after/locality"]
    assert run.data.metrics["eval/before/edit_success"] == scores["before"]["edit_success"]
