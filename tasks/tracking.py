"""MLflow helpers shared by the tasks: nested runs under the flow's parent run, flat metric dicts."""
from __future__ import annotations

from contextlib import contextmanager

import mlflow


@contextmanager
def step_run(name: str, parent_run_id: str, params: dict | None = None):
    """A nested MLflow run for one pipeline step under the flow's parent run."""
    with mlflow.start_run(run_id=parent_run_id):
        with mlflow.start_run(run_name=name, nested=True) as run:
            mlflow.set_tag("kdpo.step", name)
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            yield run


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
