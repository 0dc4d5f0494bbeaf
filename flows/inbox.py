"""``refresh_inbox``: the scheduled refresh. Every edit file in the inbox is refreshed in turn, then moved
to ``archive/`` (done, or registered before a later step failed) or ``failed/`` (with a report), so no file
is processed twice and none is lost. A file that failed makes the flow run Failed."""
from __future__ import annotations

import shutil
import traceback
from datetime import datetime, timezone
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.knowledge_refresh import Method, RefreshInputError, Settings, knowledge_refresh
from tasks.refresh import Gates
from tasks.tracking import default_tracking_uri

EDIT_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class InboxFailed(RuntimeError):
    """At least one inbox file failed; ``outcome`` says what went where."""

    def __init__(self, message: str, outcome: dict[str, list[str]]):
        super().__init__(message)
        self.outcome = outcome


@flow(name="refresh-inbox")
def refresh_inbox(
    inbox: str = "inbox", archive: str = "archive", failed: str = "failed", model: str | None = None,
    method: Method = "kdpo", model_name: str = "kdpo-world", tracking_uri: str | None = None,
    artifact_root: str | None = None, settings: Settings | None = None, gates: Gates | None = None,
    quarantine: bool = False,
) -> dict[str, list[str]]:
    """Refresh from each file waiting in ``inbox`` (oldest name first); returns what went where, or raises
    :class:`InboxFailed` (with it) if a refresh failed. A Prefect artifact lists both."""
    logger = get_run_logger()
    outcome: dict[str, list[str]] = {"archived": [], "failed": []}
    errors = []
    for path in sorted(p for p in Path(inbox).glob("*") if p.suffix in EDIT_FILE_SUFFIXES):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        state = knowledge_refresh(
            edits_path=str(path), model=model, method=method, model_name=model_name, tracking_uri=tracking_uri,
            artifact_root=artifact_root, settings=settings, gates=gates, quarantine=quarantine, return_state=True,
        )
        if state.is_completed():
            outcome["archived"].append(str(_move(path, Path(archive), stamp)))
            continue
        error = state.result(raise_on_failure=False)
        version = None if isinstance(error, RefreshInputError) else registered_version(state, tracking_uri)
        # registered: its edits are in the registry, so the file is done; else it is kept, never retried blindly
        kind = "archived" if version else "failed"
        target = _move(path, Path(archive if version else failed), stamp)
        target.with_name(target.name + ".error.txt").write_text(
            f"{type(error).__name__}: {error}\n\n{''.join(traceback.format_exception(error))}"
            if isinstance(error, BaseException) else f"{state.name}: {state.message}\n"
        )
        logger.error("%s failed%s: %s", path.name, f" after registering version {version}" if version else "", error)
        outcome[kind].append(str(target))
        errors.append(f"{path.name}: {error}")
    lines = [f"- {kind}: `{file}`" for kind, files in outcome.items() for file in files]
    create_markdown_artifact("\n".join(["# Inbox", "", *lines, *(f"- **error** {e}" for e in errors)]), key="refresh-inbox")
    if errors:
        raise InboxFailed(f"{len(errors)} inbox file(s) failed: {'; '.join(errors)}", outcome)
    return outcome


def registered_version(state, tracking_uri: str | None) -> str | None:
    """The model version the refresh flow run behind ``state`` registered before it failed, if any."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`prefect.flow_run_id` = '{state.state_details.flow_run_id}'")
    return next((run.data.tags["kdpo.model_version"] for run in runs if "kdpo.model_version" in run.data.tags), None)


def _move(path: Path, folder: Path, stamp: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stamp}-{path.name}"
    shutil.move(str(path), target)
    return target
