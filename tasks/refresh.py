"""The refresh pipeline's Prefect tasks. Each wraps a ``kdpo`` / ``data_checks`` call and logs a nested
MLflow run (parameters, metrics, artifacts) under the flow's parent run."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from pydantic import BaseModel, ConfigDict

from data_checks import split_valid, validate_requests
from kdpo.config import flat_settings
from kdpo.editing import (
    Checkpoint, SequentialResult, latest_checkpoint, load_checkpoint, make_config, memory_editor, run_sequential,
    save_checkpoint,
)
from kdpo.evaluation import EXACT, Probe, probe, summarize
from kdpo.loaders import check_context, context_limit, load_requests, write_jsonl
from kdpo.modeling import load_model, save_edited
from kdpo.requests import EditRequest
from kdpo.tables import format_table, schedule_table
from kdpo.world import model_corpus
from tasks.caching import probe_cache_key
from tasks.tracking import flat_metrics, step_run




class Gates(BaseModel):
    """The promotion gates: a refresh is promoted only if its final scores (teacher-forced and exact) reach
    each minimum and its fluency drops by at most ``max_fluency_drop``."""

    model_config = ConfigDict(extra="forbid")

    min_edit_success: float = 0.95
    min_generalization: float = 0.8
    min_locality: float = 0.9
    max_fluency_drop: float = 0.5
    min_edit_success_exact: float = 0.9
    min_generalization_exact: float = 0.7
    min_locality_exact: float = 0.9


DEFAULT_GATES = Gates().model_dump()
NO_CHAMPION = "none"  # started_from when a refresh started from the world because there was no champion


class DataGateError(RuntimeError):
    """The edit file failed the Great Expectations gate; no model was touched."""


@task(name="validate-edits")
def validate_edits(
    edits_path: str, parent_run_id: str, work_dir: str, quarantine: bool = False, model_dir: str | None = None,
) -> list[EditRequest]:
    """Load the edit file, refuse prompts that do not fit ``model_dir``'s context, and run the data gate;
    stop (or quarantine the bad records) on failure."""
    requests = load_requests(edits_path).requests
    if model_dir is not None:
        from transformers import AutoConfig, AutoTokenizer

        limit = context_limit(AutoConfig.from_pretrained(model_dir))
        check_context(requests, AutoTokenizer.from_pretrained(model_dir), limit, edits_path)
    docs = Path(work_dir) / "validation"
    report = validate_requests(requests, docs_dir=docs)
    with step_run("validate", parent_run_id, {"edits_path": edits_path, "quarantine": quarantine}):
        mlflow.log_metrics({"validate/records": len(requests), "validate/bad_records": len(report.bad_indices)})
        mlflow.log_artifacts(str(docs), "validation")
        if report.success:
            return requests
        good, bad = split_valid(requests, report)
        if not quarantine:
            listing = "; ".join(f"record {f['index']} (case_id {f['case_id']}): {', '.join(f['checks'])}"
                                for f in report.failures[:20])
            raise DataGateError(f"{edits_path}: {len(bad)} record(s) failed the data gate: {listing}")
        quarantined = Path(work_dir) / "quarantine.jsonl"
        write_jsonl(bad, quarantined)
        mlflow.log_artifact(str(quarantined), "validation")
        return good


@task(name="probe-baseline", cache_key_fn=probe_cache_key, persist_result=True)
def probe_baseline(model_dir: str, requests: list[EditRequest]) -> Probe:
    """What the starting model answers for every edit, rephrase and locality prompt (cached by the model's
    files and the requests: a resumed refresh reuses the probe of the unedited model)."""
    model, tokenizer = load_model(model_dir)
    return probe(model, tokenizer, requests)


@task(name="log-probe")
def log_probe(baseline: Probe, model_dir: str, requests: list[EditRequest], parent_run_id: str) -> None:
    """The probe's MLflow step run, whether the probe ran or came from Prefect's cache."""
    with step_run("probe", parent_run_id, {"model": model_dir, "requests": len(requests)}):
        mlflow.log_metrics(flat_metrics("probe", summarize(baseline.scores)))
        mlflow.log_table(
            {"case_id": [r.case_id for r in requests], "prompt": [r.prompt for r in requests],
             "answers_now": baseline.answers, "target_new": [r.target_new for r in requests]},
            "probe/answers.json",
        )


@task(name="apply-edits")
def apply_edits(
    model_dir: str, requests: list[EditRequest], baseline: Probe, parent_run_id: str, work_dir: str,
    method: str = "kdpo", settings: dict | None = None, checkpoint_every: int = 25, log_every: int = 10,
) -> tuple[str, dict]:
    """Sequential editing, resumed from the last checkpoint in ``work_dir/checkpoints`` if there is one.

    Per-edit metrics are MLflow step series (step = edit index; a resumed run logs the finished edits'
    again, from the checkpoint). A checkpoint is saved every ``checkpoint_every`` edits and after the last,
    and logged as the edit run's ``edit/checkpoint`` artifact (the latest one only). Every ``log_every``
    edits (and after the last) a progress line with the running edit success goes to the task's log.
    """
    logger = get_run_logger()
    config = make_config(method, overrides=settings or {})
    checkpoints = Path(work_dir) / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    model, tokenizer, resume = load_checkpoint(latest) if latest else (*load_model(model_dir), None)
    corpus = model_corpus(model_dir)
    resumed_at = resume.next_edit if resume else 0
    params = {"method": method, "checkpoint_every": checkpoint_every, "resumed_at_edit": resumed_at,
              **flat_settings(config)}
    successes: list[float] = []
    with step_run("edit", parent_run_id, params):
        def log_edit(record):
            mlflow.log_metrics(
                {"edit/steps": record.steps, "edit/seconds": record.seconds, "edit/delta_norm": record.delta_norm,
                 **flat_metrics("edit/immediate", asdict(record.immediate)), **flat_metrics("edit/drift", record.drift)},
                step=record.index,
            )
            successes.append(record.immediate.edit_success)
            if len(successes) % log_every == 0 or record.index == len(requests) - 1:
                logger.info("edit %d/%d (%s): running edit success %.3f", record.index + 1, len(requests),
                            record.case_id, sum(successes) / len(successes))

        def checkpoint(state: Checkpoint):
            mlflow.log_artifacts(str(save_checkpoint(checkpoints, model, tokenizer, state)), "edit/checkpoint")

        for record in resume.records if resume else []:
            log_edit(record)
        result: SequentialResult = run_sequential(
            model, tokenizer, requests, method, config, corpus, baseline, progress=False, on_edit=log_edit,
            resume=resume, checkpoint_every=checkpoint_every, on_checkpoint=checkpoint,
        )
        edited = Path(work_dir) / "edited-model"
        save_edited(model, tokenizer, edited, source=model_dir, new_facts=requests)
        result.write_json(Path(work_dir) / "result.json")
        mlflow.log_artifact(str(Path(work_dir) / "result.json"), "edit")
    return str(edited), result.summary()


@task(name="revert-edits")
def revert_edits(model_dir: str, case_ids: list[str], parent_run_id: str, work_dir: str, method: str = "kdpo") -> str:
    """Take edits back out of the starting model's edit memory (each subject's slot is retrained without
    them); the model without them is what this refresh edits. An unknown case_id stops the refresh."""
    model, tokenizer = load_model(model_dir)
    editor = memory_editor(model, tokenizer, method, model_corpus(model_dir))
    missing = [case_id for case_id in case_ids if not editor.revert(case_id)]
    if missing:
        raise ValueError(f"{model_dir}: no edit with case_id {', '.join(missing)} in its edit memory")
    reverted = Path(work_dir) / "reverted-model"
    save_edited(model, tokenizer, reverted, source=model_dir)
    with step_run("revert", parent_run_id, {"model": model_dir, "case_ids": ",".join(case_ids)}):
        mlflow.log_metrics({"revert/edits": len(case_ids), "revert/slots": len(editor.memory.slots)})
    return str(reverted)


@task(name="evaluate")
def evaluate_refresh(summary: dict, parent_run_id: str, gates: dict) -> dict:
    """Log the post-edit metrics against the baseline and decide the promotion gates (a minimum for each
    teacher-forced and exact score, a maximum fluency drop; a score not measured counts as 0). ``rejected``
    says which gates failed, with the measured value and the threshold."""
    final = summary["final"]
    fluency_drop = (summary["fluency_before"] or 0) - (final["fluency"] or 0)
    measured = {metric: (final[metric] or 0, f"min_{metric}") for metric in ("edit_success", "generalization", "locality")}
    measured["fluency"] = (fluency_drop, "max_fluency_drop")
    measured |= {metric: (final[metric] or 0, f"min_{metric}") for metric in EXACT}
    checks = {metric: value >= gates[gate] if gate.startswith("min_") else value <= gates[gate]
              for metric, (value, gate) in measured.items()}
    rejected = "; ".join(f"{metric} {'drop ' * (metric == 'fluency')}{value:.3f} fails {gate} {gates[gate]:g}"
                         for metric, (value, gate) in measured.items() if not checks[metric])
    with step_run("evaluate", parent_run_id, gates):
        mlflow.log_metrics(flat_metrics("eval", {**summary, "fluency_drop": fluency_drop}))
        mlflow.log_dict({"summary": summary, "gates": gates, "checks": checks, "rejected": rejected}, "eval/gates.json")
    return {"passed": all(checks.values()), "checks": checks, "rejected": rejected}


@task(name="register-model", retries=2, retry_delay_seconds=2)
def register_model(
    edited_dir: str, parent_run_id: str, model_name: str, decision: dict, description: str, refresh_key: str,
    started_from: str | None = None,
) -> dict:
    """Register the edited model (an MLflow pyfunc) as ``challenger``, and as ``champion`` if it passed its
    gates and the champion is still ``started_from`` (the version it was edited from; ``NO_CHAMPION``: none;
    None: a model given, not checked), so a concurrent refresh's promotion is never silently replaced.

    Idempotent: the version carries ``kdpo.refresh_key``, and a retry or re-run of the same refresh finds
    it instead of creating a second one. A version not promoted is tagged ``rejected`` (failed gates, with
    values and thresholds) or ``not_promoted`` (the champion moved)."""
    from tasks.pyfunc import log_pyfunc

    client = MlflowClient()
    found = client.search_model_versions(f"name = '{model_name}' and tags.`kdpo.refresh_key` = '{refresh_key}'")
    with step_run("register", parent_run_id, {"model_name": model_name, "refresh_key": refresh_key,
                                              "started_from_champion": started_from}):
        if found:
            version = str(found[0].version)
        else:
            model_uri = log_pyfunc(edited_dir).model_uri
            version = str(mlflow.register_model(model_uri, model_name, tags={"kdpo.refresh_key": refresh_key}).version)
    client.update_model_version(model_name, version, description=description)
    client.set_registered_model_alias(model_name, "challenger", version)
    previous = _alias_version(client, model_name, "champion")
    if previous == version:  # promoted already (a retry): the champion it replaced
        previous = client.get_model_version(model_name, version).tags.get("replaced_champion")
    moved = started_from is not None and (previous or NO_CHAMPION) != started_from
    not_promoted = (f"the champion moved during this refresh (started from: {started_from}, champion now: "
                    f"{previous})" if moved else "")
    if not decision["passed"]:
        client.set_model_version_tag(model_name, version, "rejected", decision["rejected"])
    elif not_promoted:
        client.set_model_version_tag(model_name, version, "not_promoted", not_promoted)
        get_run_logger().warning("%s version %s not promoted: %s", model_name, version, not_promoted)
    else:
        if previous is not None:
            client.set_registered_model_alias(model_name, "previous-champion", previous)
            client.set_model_version_tag(model_name, version, "replaced_champion", previous)
        client.set_registered_model_alias(model_name, "champion", version)
    promoted = decision["passed"] and not moved
    return {"version": version, "promoted": promoted, "previous_champion": previous, "not_promoted": not_promoted}


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def summary_markdown(summary: dict, outcome: dict) -> str:
    """The Prefect flow-run artifact: the result table, the gates with their thresholds, the registered version,
    its alias and where to look (``tasks.dashboards.refresh_outcome``; links only where a server serves them)."""
    from kdpo.report import outcome_rows

    gates = [[g["gate"], g["value"], f"{g['threshold']:g}", "passed" if g["passed"] else "**FAILED**"]
             for g in outcome["gates"]]
    where = [[what, markdown_link(text, href)] for what, text, href in outcome_rows(outcome)]
    return (
        f"# Knowledge refresh: {summary['edits']} edits with {summary['method']}\n\n"
        f"{schedule_table(summary, markdown=True)}\n\nRetention {summary['retention']:.3f}.\n\n"
        f"{format_table(['gate', 'measured', 'threshold', 'result'], gates, markdown=True)}\n\n"
        f"{format_table(['', ''], where, markdown=True)}\n"
    )


def markdown_link(text: str, href: str | None) -> str:
    """A Markdown link, or the text as code where there is nothing to link to."""
    return f"[{text}]({href})" if href else f"`{text}`"
