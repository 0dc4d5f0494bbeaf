"""The MLflow side of the reports: read a refresh's result, outcome (version, alias, gates, links) and the
last N refreshes of an experiment, log a rendered report, and the refresh flow's ``report`` task. ``kdpo report`` imports this module lazily
(``kdpo`` itself never imports MLflow); rendering is ``kdpo.report``'s."""
from __future__ import annotations

import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, urlparse

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from prefect import task

from kdpo.report import (
    ReportInputError, gate_results, render_compare, render_result, write_report,
)
from kdpo.tables import schedule_table
from tasks.refresh import DEFAULT_GATES
from tasks.tracking import default_tracking_uri, flat_metrics

RESULT_ARTIFACT = "edit/result.json"


class RunNotFound(ReportInputError):
    """An MLflow run or experiment the report was asked for is not there (or has no result)."""


def client(tracking_uri: str | None = None) -> MlflowClient:
    """A client for ``tracking_uri``, else the refresh flow's default store."""
    return MlflowClient(tracking_uri or default_tracking_uri())


def _child_runs(client: MlflowClient, run: Run, step: str) -> list[Run]:
    return client.search_runs(
        [run.info.experiment_id],
        f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.`kdpo.step` = '{step}'",
        order_by=["attributes.start_time DESC"],
    )


def edit_run(client: MlflowClient, run_id: str) -> Run:
    """The run holding ``edit/result.json``: ``run_id`` itself if it is an edit step, else its edit child."""
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        raise RunNotFound(f"no MLflow run {run_id!r} at {client.tracking_uri}") from error
    if run.data.tags.get("kdpo.step") == "edit":
        return run
    children = _child_runs(client, run, "edit")
    if not children:
        raise RunNotFound(f"run {run_id} is neither a refresh's edit step nor a refresh with one")
    return children[0]


def run_result(client: MlflowClient, run_id: str) -> dict:
    """The sequential result (``SequentialResult.to_dict()``) a refresh run logged, with the refresh's
    ``outcome`` (:func:`refresh_outcome`)."""
    run = edit_run(client, run_id)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run.info.run_id, RESULT_ARTIFACT, folder)
        except (mlflow.exceptions.MlflowException, OSError) as error:
            raise RunNotFound(f"run {run.info.run_id} has no artifact {RESULT_ARTIFACT}") from error
        result = json.loads(Path(path).read_text())
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])  # an edit step is always nested
    return result | {"outcome": refresh_outcome(client, parent)}


def server_url(tracking_uri: str) -> str | None:
    """The base URL of an http(s) tracking server; None for a local store (no UI is serving it)."""
    return tracking_uri.rstrip("/") if urlparse(tracking_uri).scheme in ("http", "https") else None


def prefect_ui_url() -> str | None:
    """The Prefect UI of the API this process uses: ``PREFECT_UI_URL``, else ``PREFECT_API_URL`` without
    ``/api``; None on the ephemeral API."""
    from prefect.settings import get_current_settings

    return get_current_settings().ui_url


def refresh_links(tracking_uri: str, experiment: str, run_id: str, model_name: str | None, version: str | None,
                  flow_run_id: str | None, prefect_ui: str | None) -> dict[str, str | None]:
    """Links to a refresh's MLflow run, its reports, its model version and its Prefect flow run; None where
    nothing serves them (a local MLflow store, Prefect's ephemeral API)."""
    server = server_url(tracking_uri)
    run = f"{server}/#/experiments/{experiment}/runs/{run_id}" if server else None
    return {
        "mlflow_run": run,
        "report": run and f"{run}/artifacts/report/report.html",
        "compare": run and f"{run}/artifacts/report/compare/report.html",
        "model_version": f"{server}/#/models/{quote(model_name)}/versions/{version}" if server and version else None,
        "prefect_flow_run": f"{prefect_ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if prefect_ui and flow_run_id
        else None,
    }


def logged_thresholds(evaluation: Run) -> dict[str, float]:
    """The promotion thresholds an evaluate step ran with (its params), else the flow's default gates."""
    params = evaluation.data.params
    return {gate: float(params[gate]) for gate in DEFAULT_GATES if gate in params} or dict(DEFAULT_GATES)


def refresh_outcome(client: MlflowClient, parent: Run) -> dict:
    """What a refresh (its parent run) registered: model version, its champion / challenger alias, whether it
    was promoted or why not (the version's ``rejected`` / ``not_promoted`` tag), the gates with the values
    measured and their thresholds, and links (:func:`refresh_links`) or, for a local store, the UI command."""
    tags = parent.data.tags
    name, version = tags.get("kdpo.model_name"), tags.get("kdpo.model_version")
    registered = client.get_model_version(name, version) if name and version else None
    aliases = [alias for alias in ("champion", "challenger") if registered and alias in registered.aliases]
    if registered is None:
        why_not = "nothing registered"
    elif rejected := registered.tags.get("rejected"):
        why_not = f"rejected by its gates: {rejected}"
    else:
        why_not = registered.tags.get("not_promoted", "")  # the champion moved during the refresh
    evaluations = _child_runs(client, parent, "evaluate")
    gates = (gate_results(logged_thresholds(evaluations[0]), unflatten(evaluations[0].data.metrics, "eval"))
             if evaluations else [])
    tracking_uri = client.tracking_uri
    return {
        "model_name": name, "version": version, "aliases": aliases, "promoted": registered is not None and not why_not,
        "why_not": why_not, "gates": gates, "run_id": parent.info.run_id, "flow_run_id": tags.get("prefect.flow_run_id"),
        "links": refresh_links(tracking_uri, parent.info.experiment_id, parent.info.run_id, name, version,
                               tags.get("prefect.flow_run_id"), prefect_ui_url()),
        "mlflow_ui": None if server_url(tracking_uri) else f"mlflow ui --backend-store-uri {tracking_uri}",
    }


def unflatten(metrics: dict[str, float], prefix: str) -> dict:
    """``{"eval/final/edit_success": 1.0}`` -> ``{"final": {"edit_success": 1.0}}`` (inverse of flat_metrics)."""
    nested: dict = {}
    for name, value in metrics.items():
        if not name.startswith(prefix + "/"):
            continue
        *parents, leaf = name[len(prefix) + 1 :].split("/")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return nested


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise RunNotFound(f"no MLflow experiment {name!r} at {client.tracking_uri}")
    return experiment.experiment_id


def started(run: Run) -> str:
    """A run's start time, UTC, to the second."""
    return datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def recent_refreshes(client: MlflowClient, experiment: str, last: int = 10) -> list[dict]:
    """The last ``last`` refreshes of an experiment (id) that finished their evaluation, oldest first:
    run id and name, start time, method, model version, the summary (from the evaluate step's metrics) and
    the gates (:func:`kdpo.report.gate_results`, with the thresholds the evaluate step logged)."""
    evaluations = client.search_runs(
        [experiment], "tags.`kdpo.step` = 'evaluate' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=last,
    )
    refreshes = []
    for evaluation in reversed(evaluations):
        parent = client.get_run(evaluation.data.tags["mlflow.parentRunId"])
        summary = unflatten(evaluation.data.metrics, "eval")
        refreshes.append({
            "run_id": parent.info.run_id, "name": parent.info.run_name, "started": started(parent),
            "method": parent.data.params.get("method"), "model_version": parent.data.tags.get("kdpo.model_version"),
            "summary": summary, "gates": gate_results(logged_thresholds(evaluation), summary),
        })
    return refreshes


def refresh_run_name(model_name: str, summary: dict, edits_path: str, version: str | None = None) -> str:
    """What a refresh run changed, e.g. ``kdpo-world v3: 20 kdpo edits from edits.jsonl``."""
    model = f"{model_name} v{version}" if version else model_name
    return f"{model}: {summary['edits']} {summary['method']} edits from {Path(edits_path).name}"


def version_description(summary: dict, edits_path: str, decision: dict, run_id: str) -> str:
    """The registered model version's description (Markdown): what was edited, the scores, the gates."""
    gates = ", ".join(f"{name} {'passed' if ok else 'FAILED'}" for name, ok in decision["checks"].items())
    return (
        f"{summary['edits']} sequential {summary['method']} edits from `{Path(edits_path).name}`.\n\n"
        f"{schedule_table(summary, markdown=True)}\n\n"
        f"Retention {summary['retention']:.3f}; fluency before editing {summary['fluency_before']:.3f}; "
        f"{summary['seconds_per_edit']:.2f} s/edit. Gates: {gates}. MLflow run `{run_id}`."
    )


def log_final_series(client: MlflowClient, run_id: str, result: dict) -> None:
    """The result's after-the-last-edit scores on ``run_id``: per-edit step series (``edit/final/...``,
    ``edit/held``) for the UI's curves, and the headline figures (``eval/...``) for its run table."""
    now = int(time.time() * 1000)
    per_edit = [
        mlflow.entities.Metric(name, value, now, record["index"])
        for record, scores in zip(result["records"], result["final"])
        for name, value in (flat_metrics("edit/final", scores) | {"edit/held": float(record["held"])}).items()
    ]
    headline = [mlflow.entities.Metric(name, value, now, 0)
                for name, value in flat_metrics("eval", result["summary"]).items()]
    for start in range(0, len(per_edit + headline), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=(per_edit + headline)[start : start + 1000])


def log_report(client: MlflowClient, run_id: str, out_dir: Path, artifact_path: str) -> str:
    """Log ``out_dir`` (report.html and its PNGs) under ``artifact_path`` of the run; the report's URI."""
    client.log_artifacts(run_id, str(out_dir), artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}/report.html"


@task(name="report")
def report_refresh(parent_run_id: str, title: str, compare_last: int = 10) -> dict:
    """Render the refresh's report and the comparison with the experiment's last refreshes, log them under
    ``report/`` and ``report/compare/`` of the parent run, with the final per-edit series; their URIs and
    the refresh's outcome (:func:`refresh_outcome`)."""
    client = MlflowClient()
    result = run_result(client, parent_run_id)
    log_final_series(client, parent_run_id, result)
    experiment = client.get_run(parent_run_id).info.experiment_id
    with tempfile.TemporaryDirectory() as folder:
        report_dir, compare_dir = Path(folder) / "report", Path(folder) / "compare"
        report_dir.mkdir()
        compare_dir.mkdir()
        write_report(render_result(result, report_dir, title), report_dir)
        write_report(render_compare(recent_refreshes(client, experiment, compare_last), compare_dir), compare_dir)
        return {"report": log_report(client, parent_run_id, report_dir, "report"),
                "compare": log_report(client, parent_run_id, compare_dir, "report/compare"),
                "outcome": result["outcome"]}
