"""``evaluate_champion``: score the registry's champion on an edit file against the model it started from."""
from __future__ import annotations

import mlflow
from prefect import flow

from flows.knowledge_refresh import default_tracking_uri, starting_model
from kdpo.evaluation import compare_to_baseline
from kdpo.loaders import load_requests
from kdpo.world import default_world
from tasks.tracking import flat_metrics


@flow(name="evaluate-champion")
def evaluate_champion(
    edits_path: str | None = None, baseline_model: str | None = None, model_name: str = "kdpo-world",
    tracking_uri: str | None = None, experiment: str = "evaluate-champion", limit: int | None = None,
) -> dict:
    """Edit success, generalization, locality and fluency of ``models:/NAME@champion``, logged to MLflow."""
    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    mlflow.set_experiment(experiment)
    champion, version = starting_model(None, model_name)
    baseline_dir = baseline_model or str(default_world(progress=False).path)
    requests = load_requests(edits_path or f"{baseline_dir}/edits.jsonl", limit=limit).requests
    scores = compare_to_baseline(champion, baseline_dir, requests)
    with mlflow.start_run(run_name=f"evaluate {model_name}@champion"):
        mlflow.log_params({"champion": champion, "champion_version": version, "baseline": baseline_dir,
                           "requests": len(requests)})
        mlflow.log_metrics(flat_metrics("eval", scores))
    return scores
