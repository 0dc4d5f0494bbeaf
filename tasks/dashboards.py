"""The MLflow side of the reports: read a refresh's result and the last N refreshes of an experiment,
log a rendered report, and the refresh flow's ``report`` task. ``kdpo report`` imports this module lazily
(``kdpo`` itself never imports MLflow); rendering is ``kdpo.report``'s."""
from __future__ import annotations

import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from prefect import task

from kdpo.report import METRICS, ReportInputError, render_compare, render_result, write_report
from tasks.tracking import flat_metrics

RESULT_ARTIFACT = "edit/result.json"


class RunNotFound(ReportInputError):
    """An MLflow run or experiment the report was asked for is not there (or has no result)."""


def client(tracking_uri: str | None = None) -> MlflowClient:
    """A client for ``tracking_uri``, else the refresh flow's default store."""
    from flows.knowledge_refresh import default_tracking_uri  # flows import this module

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
    """The sequential result (``SequentialResult.to_dict()``) a refresh run logged."""
    run = edit_run(client, run_id)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run.info.run_id, RESULT_ARTIFACT, folder)
        except (mlflow.exceptions.MlflowException, OSError) as error:
            raise RunNotFound(f"run {run.info.run_id} has no artifact {RESULT_ARTIFACT}") from error
        return json.loads(Path(path).read_text())


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
    run id and name, start time, method, model version and the summary (from the evaluate step's metrics)."""
    evaluations = client.search_runs(
        [experiment], "tags.`kdpo.step` = 'evaluate' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=last,
    )
    refreshes = []
    for evaluation in reversed(evaluations):
        parent = client.get_run(evaluation.data.tags["mlflow.parentRunId"])
        refreshes.append({
            "run_id": parent.info.run_id, "name": parent.info.run_name, "started": started(parent),
            "method": parent.data.params.get("method"), "model_version": parent.data.tags.get("kdpo.model_version"),
            "summary": unflatten(evaluation.data.metrics, "eval"),
        })
    return refreshes


def refresh_run_name(model_name: str, summary: dict, edits_path: str, version: str | None = None) -> str:
    """What a refresh run changed, e.g. ``kdpo-world v3: 20 kdpo edits from edits.jsonl``."""
    model = f"{model_name} v{version}" if version else model_name
    return f"{model}: {summary['edits']} {summary['method']} edits from {Path(edits_path).name}"


def version_description(summary: dict, edits_path: str, decision: dict, run_id: str) -> str:
    """The registered model version's description (Markdown): what was edited, the scores, the gates."""
    rows = "\n".join(
        f"| {schedule} | " + " | ".join("-" if summary[schedule].get(m) is None else f"{summary[schedule][m]:.3f}"
                                       for m in METRICS) + " |"
        for schedule in ("immediate", "final")
    )
    gates = ", ".join(f"{name} {'passed' if ok else 'FAILED'}" for name, ok in decision["checks"].items())
    return (
        f"{summary['edits']} sequential {summary['method']} edits from `{Path(edits_path).name}`.\n\n"
        f"| schedule | {' | '.join(METRICS)} |\n|---|{'---|' * len(METRICS)}\n{rows}\n\n"
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
def report_refresh(parent_run_id: str, title: str, compare_last: int = 10) -> dict[str, str]:
    """Render the refresh's report and the comparison with the experiment's last refreshes, log them under
    ``report/`` and ``report/compare/`` of the parent run, with the final per-edit series; their URIs."""
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
                "compare": log_report(client, parent_run_id, compare_dir, "report/compare")}


def report_markdown(uris: dict[str, str]) -> str:
    """The Prefect artifact's links to the logged reports."""
    return (f"\n**Report:** [{uris['report']}]({uris['report']}) "
            f"(comparison with recent refreshes: [{uris['compare']}]({uris['compare']}))\n")
