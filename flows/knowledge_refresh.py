"""``knowledge_refresh``: validate data -> probe baseline -> sequential edits -> evaluate -> register.

``revert`` takes earlier edits back out of the starting model's edit memory before the new ones go in.
One MLflow parent run per flow run (tagged with the Prefect flow-run id), a nested run per step.
By default a refresh starts from ``models:/NAME@champion``, or from the built-in world on the first run.
The world is loaded from the builder's disk cache (built on first use), and the baseline probe is a Prefect task
cached by its inputs. Parameters are typed (the Prefect UI shows a form). A refresh works in
``$KDPO_HOME/refreshes/KEY`` (KEY: its inputs, see :func:`tasks.caching.refresh_work_dir`) and checkpoints
its edits there, under a lock (a second identical refresh is refused), so re-running a failed or interrupted
refresh resumes from the last checkpoint; the directory is removed once the refresh has finished. Arguments,
method, settings and the tracking URI are checked before any work. Only a successful registration moves
aliases, and only if the champion is still the one the refresh started from.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import urllib.error
import urllib.request
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Literal

# quiet logs: no "🏃 View run ... at: ..." lines from MLflow on every run's end, no artifact upload/download
# progress bars, and no telemetry call (and its ERROR traceback when offline) from Prefect's ephemeral server
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import ValidationError

from kdpo.config import ConfigError
from kdpo.editing import make_config
from kdpo.editors import EDITORS
from kdpo.loaders import EditDataError
from kdpo.world import recall_shortfall
from tasks.caching import RefreshLocked, refresh_lock, refresh_work_dir
from tasks.dashboards import refresh_run_name, report_refresh, version_description
from tasks.refresh import (
    DEFAULT_GATES, NO_CHAMPION, DataGateError, Gates, apply_edits, evaluate_refresh, log_probe, probe_baseline, register_model,
    revert_edits, summary_markdown, validate_edits,
)
from tasks.tracking import default_tracking_uri, end_abandoned_runs, fails_run, model_directory
from tasks.world import build_world_task

Method = Literal[tuple(EDITORS)]  # the flow's method parameter: a choice in the Prefect UI's form
Settings = dict[str, str | int | float | bool]  # editor settings by name (kdpo.editors.base.EditorConfig)


class RefreshInputError(ValueError):
    """An argument, method, setting or tracking URI the refresh cannot run with (found before any work)."""


def check_arguments(
    edits_path: str | None, model: str | None, method: str, settings: Settings | None, limit: int | None,
    checkpoint_every: int, log_every: int, gates: Gates | dict | None, tracking_uri: str,
) -> None:
    """Raise :class:`RefreshInputError` (one line) for inputs the refresh would fail on later."""
    if limit is not None and limit < 1:
        raise RefreshInputError(f"limit must be at least 1, got {limit} (leave it out to edit every record)")
    for name, value in (("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if value < 1:
            raise RefreshInputError(f"{name} must be at least 1, got {value}")
    if edits_path and not Path(edits_path).is_file():
        raise RefreshInputError(f"edit file {edits_path} does not exist or is not a file")
    if model and not Path(model).is_dir():
        raise RefreshInputError(f"model {model} is not a model directory")
    try:
        Gates.model_validate(gates or {})
    except ValidationError as error:
        problem = error.errors()[0]
        name = ".".join(map(str, problem["loc"]))
        what = "unknown gate" if problem["type"] == "extra_forbidden" else f"gate: {problem['msg']}"
        raise RefreshInputError(f"{name}: {what}; gates: {', '.join(DEFAULT_GATES)}") from None
    try:
        make_config(method, overrides=settings or {})
    except ConfigError as error:
        raise RefreshInputError(str(error)) from None
    check_tracking_uri(tracking_uri)


def check_tracking_uri(uri: str) -> None:
    """A sqlite store must be writable, an http(s) server must answer; other stores are left to MLflow."""
    try:
        if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
            with closing(sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=10)) as db:
                db.execute("BEGIN IMMEDIATE")  # takes the write lock: the file exists or can be created
        elif uri.startswith(("http://", "https://")):
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
    except urllib.error.HTTPError:
        pass  # the server answered
    except (OSError, sqlite3.Error) as error:
        raise RefreshInputError(f"MLflow tracking URI {uri} is not usable: {error}") from None


def starting_model(model: str | None, model_name: str) -> tuple[str, str | None]:
    """The model directory a refresh edits: the one given, the registry's champion, or the built world
    (when there is no champion); and the champion version it started from (None for a model given,
    ``NO_CHAMPION`` for the world)."""
    if model:
        return model, None
    try:
        version = str(mlflow.MlflowClient().get_model_version_by_alias(model_name, "champion").version)
    except mlflow.exceptions.MlflowException:
        return str(build_world_task().path), NO_CHAMPION
    return model_directory(f"models:/{model_name}/{version}"), version


@contextmanager
def resumable_or_removed(work_dir: Path, logger):
    """If the block fails: keep the work folder when it holds a checkpoint (re-running the same refresh resumes
    from it) and say so, else remove it (there is nothing to resume) and say that."""
    try:
        yield
    except BaseException:
        if any((work_dir / "checkpoints").glob("checkpoint-*")):
            logger.error("refresh failed; its checkpoints are kept in %s: re-run the same refresh to resume", work_dir)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
            logger.error("refresh failed before its first checkpoint: nothing to resume, %s removed", work_dir)
        raise


@flow(name="knowledge-refresh")
def knowledge_refresh(
    edits_path: str | None = None,
    model: str | None = None,
    method: Method = "kdpo",
    settings: Settings | None = None,
    model_name: str = "kdpo-world",
    experiment: str = "knowledge-refresh",
    tracking_uri: str | None = None,
    artifact_root: str | None = None,
    limit: int | None = None,
    quarantine: bool = False,
    gates: Gates | None = None,
    checkpoint_every: int = 25,
    revert: list[str] | None = None,
    log_every: int = 10,
    allow_weak_world: bool = False,
) -> dict:
    """Refresh a model's knowledge from an edit file and register the result (see module docstring)."""
    tracking_uri = tracking_uri or default_tracking_uri()
    check_arguments(edits_path, model, method, settings, limit, checkpoint_every, log_every, gates, tracking_uri)
    logger = get_run_logger()
    mlflow.set_tracking_uri(tracking_uri)
    if "MLFLOW_RUN_ID" not in os.environ:  # under `mlflow run`, that run is the parent, in its experiment
        if mlflow.get_experiment_by_name(experiment) is None:
            from kdpo.artifacts import experiment_artifact_location  # http(s) tracking: the server decides

            location = experiment_artifact_location(mlflow.get_tracking_uri(), artifact_root)
            mlflow.create_experiment(experiment, artifact_location=location)
        mlflow.set_experiment(experiment)
    gates = Gates.model_validate(gates or {}).model_dump()
    model_dir, started_from = starting_model(model, model_name)
    if (weak := recall_shortfall(model_dir)) and not allow_weak_world:
        raise RefreshInputError(f"{weak}: rebuild it with more epochs (kdpo world build --set max_epochs=N), "
                                "or pass --allow-weak-world")
    edits_path = edits_path or str(Path(model_dir) / "edits.jsonl")
    work_dir = refresh_work_dir(edits_path, model_dir, method, settings, limit, quarantine, revert)
    with refresh_lock(work_dir):
        with mlflow.start_run(run_name=f"{model_name}: {method} edits from {Path(edits_path).name}") as parent:
            mlflow.set_tags({"prefect.flow_run_id": str(flow_run.get_id()), "kdpo.model_name": model_name,
                             "kdpo.refresh_key": work_dir.name})
            mlflow.log_params({"edits_path": edits_path, "model": model_dir, "method": method, "limit": limit,
                               "work_dir": str(work_dir), "started_from_champion": started_from})
            parent_id = parent.info.run_id
        for run_id in end_abandoned_runs(parent.info.experiment_id, work_dir.name, parent_id):
            logger.warning("MLflow run %s of an earlier, killed try of this refresh marked KILLED", run_id)
        with fails_run(parent_id), resumable_or_removed(work_dir, logger):
            if revert:  # edits taken back out of the starting model's memory before this refresh's edits
                model_dir = revert_edits(model_dir, list(revert), parent_id, str(work_dir), method)
            requests = validate_edits(edits_path, parent_id, str(work_dir), quarantine, model_dir)[:limit]
            baseline = probe_baseline(model_dir, requests)
            log_probe(baseline, model_dir, requests, parent_id)
            edited_dir, summary = apply_edits(
                model_dir, requests, baseline, parent_id, str(work_dir), method, settings, checkpoint_every, log_every
            )
            decision = evaluate_refresh(summary, parent_id, gates)
            description = version_description(summary, edits_path, decision, parent_id)
            registration = register_model(edited_dir, parent_id, model_name, decision, description, work_dir.name,
                                          started_from)
            with mlflow.start_run(run_id=parent_id):
                mlflow.set_tag("kdpo.model_version", registration["version"])
                run_name = refresh_run_name(model_name, summary, edits_path, registration["version"])
                mlflow.set_tag("mlflow.runName", run_name)
            reports = report_refresh(parent_id, run_name)
            create_markdown_artifact(summary_markdown(summary, reports["outcome"]), key="knowledge-refresh")
        shutil.rmtree(work_dir)  # last: until here, a re-run resumes (and finds the registered version)
    logger.info("model version %s, promoted: %s%s", registration["version"], registration["promoted"],
                f" ({registration['not_promoted']})" if registration["not_promoted"] else "")
    return {"run_id": parent_id, "summary": summary, "gates": decision, **registration, "reports": reports}


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.knowledge_refresh [--edits FILE] [--limit N] ...``: one refresh, Prefect's ephemeral API."""
    import argparse

    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP, temporary_settings

    from kdpo.tables import summary_table

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--edits", dest="edits_path", help="edit-request file (default: the starting model's edits)")
    parser.add_argument("--model", help="model directory to edit (default: models:/NAME@champion, else the world)")
    parser.add_argument("--method", default="kdpo")
    parser.add_argument("--model-name", default="kdpo-world")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--quarantine", action="store_true", help="set bad records aside instead of stopping")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlruns.db here)")
    parser.add_argument("--artifact-root", help="where a new experiment keeps artifacts: a URI (s3://, mlflow-artifacts:, ...) as "
                        "given, a local path as a file URI (default: the tracking server's artifact store for an "
                        "http(s) tracking URI, else ./mlartifacts)")
    parser.add_argument("--checkpoint-every", type=int, default=25, help="save a resumable checkpoint every N edits")
    parser.add_argument("--revert", nargs="+", metavar="CASE_ID",
                        help="take these edits out of the starting model's edit memory first")
    parser.add_argument("--set", dest="settings", action="append", metavar="KEY=VALUE", help="a method setting")
    parser.add_argument("--gate", dest="gates", action="append", metavar="NAME=VALUE",
                        help=f"a promotion gate, e.g. min_locality=0.8 (gates: {', '.join(DEFAULT_GATES)})")
    parser.add_argument("--log-every", type=int, default=10, help="log the edits' progress every N edits")
    parser.add_argument("--allow-weak-world", action="store_true",
                        help="edit a world whose build missed its recall bar (refused otherwise)")
    args = parser.parse_args(argv)
    try:
        args.settings = dict(item.split("=", 1) for item in args.settings) if args.settings else None
        args.gates = {k: float(v) for k, v in (item.split("=", 1) for item in args.gates)} if args.gates else None
    except ValueError:
        parser.error("--set and --gate take NAME=VALUE (a gate's value is a number)")
    try:  # checked here too, before Prefect starts: the answer is one line, not a flow run's traceback
        check_arguments(args.edits_path, args.model, args.method, args.settings, args.limit, args.checkpoint_every,
                        args.log_every, args.gates, args.tracking_uri or default_tracking_uri())
        with temporary_settings({STARTUP: max(STARTUP.value(), 120)}):  # Prefect's default 20 s is short on a busy CPU
            result = knowledge_refresh(**vars(args))
    except (RefreshInputError, RefreshLocked, EditDataError, DataGateError) as error:
        parser.exit(2, f"error: {error}\n")
    print(summary_table([result["summary"]]))
    print("gates: " + ", ".join(f"{name} {'passed' if ok else 'FAILED'}" for name, ok in result["gates"]["checks"].items()))
    alias = "champion" if result["promoted"] else "challenger only (the champion stays)"
    print(f"registered {args.model_name} version {result['version']}: {alias}; MLflow run {result['run_id']}")
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    print(f"MLflow UI: {mlflow_cli} ui --backend-store-uri {args.tracking_uri or default_tracking_uri()}")


if __name__ == "__main__":
    main()
