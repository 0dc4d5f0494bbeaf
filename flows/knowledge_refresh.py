"""``knowledge_refresh``: validate data -> probe baseline -> sequential edits -> evaluate -> register.

``revert`` takes earlier edits back out of the starting model's edit memory before the new ones go in.
One MLflow parent run per flow run (tagged with the Prefect flow-run id), a nested run per step.
By default a refresh starts from ``models:/NAME@champion``, or from the built-in world on the first run.
The world build and the baseline probe are Prefect tasks cached by their inputs. A refresh works in
``$KDPO_HOME/refreshes/KEY`` (KEY: its inputs, see :func:`tasks.caching.refresh_work_dir`) and checkpoints
its edits there, so re-running a failed or interrupted refresh resumes from the last checkpoint; the
directory is removed once the edited model is registered. Only a successful registration moves aliases.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import mlflow
import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tasks.caching import refresh_work_dir
from tasks.dashboards import refresh_run_name, report_markdown, report_refresh, version_description
from tasks.refresh import (
    apply_edits, evaluate_refresh, log_probe, probe_baseline, register_model, revert_edits, summary_markdown,
    validate_edits,
)
from tasks.world import cached_world

DEFAULT_GATES = {  # a refresh is promoted only if its final scores (teacher-forced and exact) reach these
    "min_edit_success": 0.95, "min_generalization": 0.8, "min_locality": 0.9, "max_fluency_drop": 0.5,
    "min_edit_success_exact": 0.9, "min_generalization_exact": 0.7, "min_locality_exact": 0.9,
}


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` (set by ``mlflow run``), else a sqlite store inside the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def starting_model(model: str | None, model_name: str) -> str:
    """The model directory a refresh edits: the one given, the registry's champion, or the built world."""
    if model:
        return model
    try:
        root = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}@champion"))
    except mlflow.exceptions.MlflowException:
        return str(cached_world().path)
    flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
    return str(root / flavor["artifacts"]["model_dir"]["path"])  # the pyfunc's copy of the HF directory


@flow(name="knowledge-refresh")
def knowledge_refresh(
    edits_path: str | None = None,
    model: str | None = None,
    method: str = "kdpo",
    settings: dict | None = None,
    model_name: str = "kdpo-world",
    experiment: str = "knowledge-refresh",
    tracking_uri: str | None = None,
    artifact_root: str | None = None,
    limit: int | None = None,
    quarantine: bool = False,
    gates: dict | None = None,
    checkpoint_every: int = 25,
    revert: list[str] | None = None,
) -> dict:
    """Refresh a model's knowledge from an edit file and register the result (see module docstring)."""
    logger = get_run_logger()
    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    if "MLFLOW_RUN_ID" not in os.environ:  # under `mlflow run`, that run is the parent, in its experiment
        if mlflow.get_experiment_by_name(experiment) is None:
            location = Path(artifact_root or "mlartifacts").resolve().as_uri()
            mlflow.create_experiment(experiment, artifact_location=location)
        mlflow.set_experiment(experiment)
    gates = DEFAULT_GATES | (gates or {})
    model_dir = starting_model(model, model_name)
    edits_path = edits_path or str(Path(model_dir) / "edits.jsonl")
    work_dir = refresh_work_dir(edits_path, model_dir, method, settings, limit, quarantine, revert)
    with mlflow.start_run(run_name=f"{model_name}: {method} edits from {Path(edits_path).name}") as parent:
        mlflow.set_tags({"prefect.flow_run_id": str(flow_run.get_id()), "kdpo.model_name": model_name})
        mlflow.log_params({"edits_path": edits_path, "model": model_dir, "method": method, "limit": limit,
                           "work_dir": str(work_dir)})
        parent_id = parent.info.run_id
    if revert:  # edits taken back out of the starting model's memory before this refresh's edits
        model_dir = revert_edits(model_dir, list(revert), parent_id, str(work_dir), method)
    requests = validate_edits(edits_path, parent_id, str(work_dir), quarantine)
    requests = requests[:limit] if limit else requests
    baseline = probe_baseline(model_dir, requests)
    log_probe(baseline, model_dir, requests, parent_id)
    edited_dir, summary = apply_edits(
        model_dir, requests, baseline, parent_id, str(work_dir), method, settings, checkpoint_every
    )
    decision = evaluate_refresh(summary, parent_id, gates)
    description = version_description(summary, edits_path, decision, parent_id)
    registration = register_model(edited_dir, parent_id, model_name, decision["passed"], description)
    shutil.rmtree(work_dir)  # the edited model is in the registry now; its checkpoints are not needed
    with mlflow.start_run(run_id=parent_id):
        mlflow.set_tag("kdpo.model_version", registration["version"])
        run_name = refresh_run_name(model_name, summary, edits_path, registration["version"])
        mlflow.set_tag("mlflow.runName", run_name)
    reports = report_refresh(parent_id, run_name)
    create_markdown_artifact(summary_markdown(summary, registration, parent_id) + report_markdown(reports),
                             key="knowledge-refresh")
    logger.info("model version %s, promoted: %s", registration["version"], registration["promoted"])
    return {"run_id": parent_id, "summary": summary, "gates": decision, **registration, "reports": reports}


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.knowledge_refresh [--edits FILE] [--limit N] ...``: one refresh, Prefect's ephemeral API."""
    import argparse

    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP, temporary_settings

    from kdpo.cli import summary_table

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--edits", dest="edits_path", help="edit-request file (default: the starting model's edits)")
    parser.add_argument("--model", help="model directory to edit (default: models:/NAME@champion, else the world)")
    parser.add_argument("--method", default="kdpo")
    parser.add_argument("--model-name", default="kdpo-world")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--quarantine", action="store_true", help="set bad records aside instead of stopping")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlruns.db here)")
    parser.add_argument("--artifact-root", help="where a new experiment keeps artifacts (default: ./mlartifacts)")
    parser.add_argument("--checkpoint-every", type=int, default=25, help="save a resumable checkpoint every N edits")
    parser.add_argument("--revert", nargs="+", metavar="CASE_ID",
                        help="take these edits out of the starting model's edit memory first")
    args = parser.parse_args(argv)
    with temporary_settings({STARTUP: max(STARTUP.value(), 120)}):  # Prefect's default 20 s is short on a busy CPU
        result = knowledge_refresh(**vars(args))
    print(summary_table([result["summary"]]))
    print("gates: " + ", ".join(f"{name} {'passed' if ok else 'FAILED'}" for name, ok in result["gates"]["checks"].items()))
    alias = "champion" if result["promoted"] else "challenger only (the champion stays)"
    print(f"registered {args.model_name} version {result['version']}: {alias}; MLflow run {result['run_id']}")
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    print(f"MLflow UI: {mlflow_cli} ui --backend-store-uri {args.tracking_uri or default_tracking_uri()}")


if __name__ == "__main__":
    main()
