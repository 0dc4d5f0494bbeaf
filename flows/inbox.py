"""``refresh_inbox``: the scheduled refresh. Every edit file in the inbox is refreshed in turn, then moved
to ``archive/`` (done) or ``failed/`` (with a report), so no file is processed twice and none is lost."""
from __future__ import annotations

import shutil
import traceback
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger

from flows.knowledge_refresh import knowledge_refresh

EDIT_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@flow(name="refresh-inbox")
def refresh_inbox(
    inbox: str = "inbox", archive: str = "archive", failed: str = "failed", model: str | None = None, method: str = "kdpo",
    model_name: str = "kdpo-world", tracking_uri: str | None = None, artifact_root: str | None = None,
    settings: dict | None = None, gates: dict | None = None, quarantine: bool = False,
) -> dict[str, list[str]]:
    """Refresh from each file waiting in ``inbox`` (oldest name first); returns what went where."""
    logger = get_run_logger()
    outcome: dict[str, list[str]] = {"archived": [], "failed": []}
    for path in sorted(p for p in Path(inbox).glob("*") if p.suffix in EDIT_FILE_SUFFIXES):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        try:
            knowledge_refresh(edits_path=str(path), model=model, method=method, model_name=model_name, tracking_uri=tracking_uri,
                              artifact_root=artifact_root, settings=settings, gates=gates, quarantine=quarantine)
        except Exception as error:  # a failed file is kept with its report, never lost or retried blindly
            target = _move(path, Path(failed), stamp)
            target.with_name(target.name + ".error.txt").write_text(
                f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}"
            )
            logger.error("%s failed: %s", path.name, error)
            outcome["failed"].append(str(target))
        else:
            outcome["archived"].append(str(_move(path, Path(archive), stamp)))
    return outcome


def _move(path: Path, folder: Path, stamp: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stamp}-{path.name}"
    shutil.move(str(path), target)
    return target
