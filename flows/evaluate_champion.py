"""``evaluate_champion``: score the registry's champion on its own edit history against the model it started from.

The champion's edit memory lists the facts it holds (by case_id); their requests, with the rephrase and locality
prompts the memory does not keep, come from the edit files of the refreshes that made it (each version's
``edits_path``, back along the champions it was edited from), the edits the model carries, or the baseline's.
An ``edits_path`` given explicitly is scored as it is instead.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from prefect import flow

from flows.knowledge_refresh import starting_model
from kdpo.evaluation import compare_to_baseline
from kdpo.loaders import load_requests
from kdpo.memory import EditMemory
from kdpo.modeling import load_model
from kdpo.requests import EditRequest
from kdpo.world import default_world
from tasks.refresh import NO_CHAMPION
from tasks.tracking import default_tracking_uri, flat_metrics


def memory_case_ids(model_dir: str) -> list[str]:
    """The case_ids of the facts the model's edit memory holds, slot by slot (none without a memory)."""
    memory = EditMemory.of(load_model(model_dir)[0])
    return [fact.case_id for slot in memory.slots for fact in slot.facts] if memory else []


def lineage_edit_files(client: MlflowClient, model_name: str, version: str) -> list[str]:
    """The edit files of the refreshes that registered ``version`` and the champions it was edited from,
    newest first (each version's run is its refresh's register step; the refresh logged ``edits_path`` and
    ``started_from_champion``)."""
    files, seen = [], set()
    while version and version.isdigit() and version not in seen:
        seen.add(version)
        run = client.get_run(client.get_model_version(model_name, version).run_id)
        refresh = client.get_run(run.data.tags.get("mlflow.parentRunId", run.info.run_id))
        files.append(refresh.data.params.get("edits_path"))
        version = refresh.data.params.get("started_from_champion")
    return [path for path in files if path]


def history_requests(case_ids: list[str], files: list[str]) -> list[EditRequest]:
    """The requests of ``case_ids``, in that order, each from the first of ``files`` that has it (files not
    on this machine are skipped); ValueError naming the case_ids none of them has."""
    found: dict[str, EditRequest] = {}
    for path in dict.fromkeys(files):
        if Path(path).is_file() and not set(case_ids) <= found.keys():
            for request in load_requests(path).requests:
                found.setdefault(request.case_id, request)
    if missing := [case_id for case_id in case_ids if case_id not in found]:
        raise ValueError(f"no edit request for case_id(s) {', '.join(missing[:10])} of the champion's edit memory in "
                         f"{', '.join(files)}; pass edits_path")
    return [found[case_id] for case_id in case_ids]


@flow(name="evaluate-champion")
def evaluate_champion(
    edits_path: str | None = None, baseline_model: str | None = None, model_name: str = "kdpo-world",
    tracking_uri: str | None = None, experiment: str = "evaluate-champion", limit: int | None = None,
) -> dict:
    """Edit success, generalization, locality and fluency of ``models:/NAME@champion`` on its own edits (or on
    ``edits_path``), logged to MLflow with the version scored and its ``models:/`` URI; the scores, that
    version and the case_ids scored."""
    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    mlflow.set_experiment(experiment)
    champion, version = starting_model(None, model_name)
    if version == NO_CHAMPION:
        raise ValueError(f"registered model {model_name!r} has no champion to evaluate")
    baseline_dir = baseline_model or str(default_world(progress=False).path)
    if edits_path:
        requests = load_requests(edits_path, limit=limit).requests
    else:
        if not (held := memory_case_ids(champion)):
            raise ValueError(f"{model_name} v{version} holds no edits in an edit memory; pass edits_path to score it")
        files = [*lineage_edit_files(MlflowClient(), model_name, version), f"{champion}/edits.jsonl",
                 f"{baseline_dir}/edits.jsonl"]
        requests = history_requests(held, files)[:limit]
    scores = compare_to_baseline(champion, baseline_dir, requests)
    case_ids = [request.case_id for request in requests]
    model_uri = f"models:/{model_name}/{version}"
    with mlflow.start_run(run_name=f"evaluate {model_name} v{version} (champion)"):
        mlflow.set_tags({"kdpo.model_name": model_name, "kdpo.model_version": version, "kdpo.model_uri": model_uri})
        mlflow.log_params({"model_uri": model_uri, "model_version": version, "baseline": baseline_dir,
                           "edits": edits_path or "the champion's edit history", "requests": len(requests)})
        mlflow.log_metrics(flat_metrics("eval", scores))
        mlflow.log_dict({"case_ids": case_ids}, "eval/case_ids.json")
    return scores | {"model_version": version, "case_ids": case_ids}
