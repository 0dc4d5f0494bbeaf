"""MLflow helpers shared by the tasks: nested runs under the flow's parent run, flat metric dicts, and the
end states of a refresh's runs (FAILED when it stops, KILLED when a killed try is found)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` (set by ``mlflow run``), else a sqlite store inside the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


@contextmanager
def step_run(name: str, parent_run_id: str, params: dict | None = None):
    """A nested MLflow run for one pipeline step under the flow's parent run."""
    with mlflow.start_run(run_id=parent_run_id):
        with mlflow.start_run(run_name=name, nested=True) as run:
            mlflow.set_tag("kdpo.step", name)
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            yield run


@contextmanager
def fails_run(run_id: str):
    """End the run FAILED if the block raises (a refresh that stopped part-way never looks FINISHED)."""
    try:
        yield
    except BaseException:
        MlflowClient().set_terminated(run_id, "FAILED")
        raise


def end_abandoned_runs(experiment_id: str, refresh_key: str, current_run_id: str) -> list[str]:
    """Mark KILLED the runs an earlier try of the same refresh left RUNNING (its process was killed; the
    caller holds the refresh's lock, so none is alive), with their step runs; their ids."""
    client = MlflowClient()
    running = "attributes.status = 'RUNNING'"
    ended = []
    for parent in client.search_runs([experiment_id], f"tags.`kdpo.refresh_key` = '{refresh_key}' and {running}"):
        if parent.info.run_id != current_run_id:
            steps = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and {running}")
            for run in [*steps, parent]:
                client.set_terminated(run.info.run_id, "KILLED")
                ended.append(run.info.run_id)
    return ended


def flat_metrics(prefix: str, values: dict) -> dict[str, float]:
    """``{"final": {"edit_success": 1.0}}`` -> ``{"prefix/final/edit_success": 1.0}``, numbers only."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            flat |= flat_metrics(name, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def model_directory(uri: str) -> str:
    """A local model directory for ``uri``: a registered pyfunc's (``models:/NAME@ALIAS``, ``models:/NAME/N``)
    copy of its Hugging Face directory, downloaded; anything else is taken as a directory already."""
    if not uri.startswith("models:/"):
        return uri
    root = Path(mlflow.artifacts.download_artifacts(uri))
    flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
    return str(root / flavor["artifacts"]["model_dir"]["path"])
