"""A Great Expectations 1.x suite that gates edit requests before a model is edited.

:func:`requests_frame` flattens :class:`~kdpo.requests.EditRequest` records into a polars
frame, one row per request, and derives boolean helper columns with polars expressions
(cross-row checks such as conflicting duplicates are easier there than in GX). The frame is
handed to GX as pandas (GX 1.x has no polars data source) and validated by the suite from
:func:`build_suite` on an ephemeral data context. :func:`validate_requests` turns GX's
``unexpected_index_list`` into one failure per bad record (its index in the input list, its
case_id and the human-readable names of the checks it failed); :func:`split_valid` splits the
requests for quarantine mode.

Comparisons: the ``target_new`` vs ``ground_truth`` check and the conflicting-duplicate
check compare answers stripped and lower-cased; "subject in prompt" is a case-insensitive
substring test; locality prompts are compared with the edited prompts after stripping.
A derived check whose inputs are missing (e.g. a null subject) passes, so the row is
reported once, by the "non-empty" check of the missing field.
"""
from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from kdpo.loaders import EditDataError
from kdpo.requests import EditRequest

if TYPE_CHECKING:  # GX takes seconds to import; it is imported where it is used.
    import great_expectations as gx

REQUIRED_FIELDS = ("case_id", "subject", "prompt", "target_new")

# check key -> human-readable name (stored in each expectation's meta["check"]).
CHECKS = {
    **{f"{name}_non_empty": f"{name} is present and non-empty" for name in REQUIRED_FIELDS},
    "case_id_unique": "case_id is unique",
    "target_differs": "target_new differs from ground_truth",
    "subject_in_prompt": "subject appears in prompt",
    "no_conflicting_duplicate": "no other request edits the same prompt to a different target",
    "prompt_length": "prompt length within limits",
    "target_length": "target_new length within limits",
    "locality_not_edited": "locality prompts are not edited prompts",
}

SUITE_NAME = "edit_requests"


@dataclass(frozen=True)
class CheckLimits:
    """Length bounds, in characters (inclusive), for the prompt and the new target."""

    prompt_min_chars: int = 1
    prompt_max_chars: int = 500
    target_min_chars: int = 1
    target_max_chars: int = 100

    def __post_init__(self) -> None:
        for low, high in ((self.prompt_min_chars, self.prompt_max_chars),
                          (self.target_min_chars, self.target_max_chars)):
            if not 0 <= low <= high:
                raise ValueError(f"bad length limits: need 0 <= min <= max, got {low}..{high}")


@dataclass
class CheckReport:
    """What :func:`validate_requests` found.

    ``failures`` holds one dict per failing record, sorted by index:
    ``{"index", "case_id", "checks": [human-readable names], "expectations": [GX types]}``.
    ``expectations`` summarises every expectation of the suite; ``validation_result`` is
    GX's own result as a JSON-able dict (what ``validation.json`` holds).
    """

    success: bool
    failures: list[dict]
    statistics: dict
    expectations: list[dict] = field(default_factory=list)
    validation_result: dict = field(default_factory=dict, repr=False)

    @property
    def bad_indices(self) -> set[int]:
        """Indices, into the validated request list, of the records that failed a check."""
        return {failure["index"] for failure in self.failures}

    def to_json(self, indent: int | None = 2) -> str:
        """The report (without GX's raw result) as JSON."""
        return json.dumps({"success": self.success, "statistics": self.statistics,
                           "failures": self.failures, "expectations": self.expectations},
                          indent=indent, default=str)


# ---------------------------------------------------------------- the frame


_SCHEMA = {
    "case_id": pl.String, "subject": pl.String, "prompt": pl.String,
    "target_new": pl.String, "ground_truth": pl.String, "n_rephrases": pl.Int64,
    "locality_prompts": pl.List(pl.String),
}


def _norm(expr: pl.Expr) -> pl.Expr:
    return expr.str.strip_chars().str.to_lowercase()


def requests_frame(requests: Sequence[EditRequest]) -> pl.DataFrame:
    """One row per request (row i is ``requests[i]``) with the derived check columns.

    Derived columns: ``subject_in_prompt``, ``target_differs``, ``conflicting_duplicate``,
    ``locality_among_edited`` (booleans) and ``prompt_chars``/``target_chars`` (lengths).
    """
    rows = [{
        "case_id": r.case_id, "subject": r.subject, "prompt": r.prompt,
        "target_new": r.target_new, "ground_truth": r.ground_truth,
        "n_rephrases": len(r.rephrase_prompts),
        "locality_prompts": [item.prompt for item in r.locality],
    } for r in requests]
    frame = pl.DataFrame(rows, schema=_SCHEMA).with_row_index("row")

    edited = frame.select(pl.col("prompt").str.strip_chars().drop_nulls().unique())["prompt"]
    locality_hits = (
        frame.select("row", "locality_prompts").explode("locality_prompts")
        .group_by("row")
        .agg(pl.col("locality_prompts").str.strip_chars().is_in(edited.implode())
             .any().alias("locality_among_edited"))
    )
    prompt_key = pl.col("prompt").str.strip_chars()
    return (
        frame.join(locality_hits, on="row", how="left")
        .sort("row")
        .with_columns(
            subject_in_prompt=_norm(pl.col("prompt"))
            .str.contains(_norm(pl.col("subject")), literal=True).fill_null(True),
            target_differs=(_norm(pl.col("target_new")) != _norm(pl.col("ground_truth")))
            .fill_null(True),
            conflicting_duplicate=pl.when(prompt_key.is_null()).then(False).otherwise(
                _norm(pl.col("target_new")).n_unique().over(prompt_key) > 1),
            locality_among_edited=pl.col("locality_among_edited").fill_null(False),
            prompt_chars=pl.col("prompt").str.len_chars(),
            target_chars=pl.col("target_new").str.len_chars(),
        )
        .drop("row")
    )


# ---------------------------------------------------------------- the suite


def build_suite(limits: CheckLimits = CheckLimits(), name: str = SUITE_NAME) -> "gx.ExpectationSuite":
    """The expectation suite over :func:`requests_frame` columns; meta["check"] names each."""
    import great_expectations as gx

    E = gx.expectations

    def meta(key: str) -> dict:
        return {"meta": {"check": CHECKS[key], "check_key": key}, "description": CHECKS[key]}

    expectations = []
    for column in REQUIRED_FIELDS:
        key = f"{column}_non_empty"
        expectations += [
            E.ExpectColumnValuesToNotBeNull(column=column, **meta(key)),
            E.ExpectColumnValuesToMatchRegex(column=column, regex=r"\S", **meta(key)),
        ]
    expectations += [
        E.ExpectColumnValuesToBeUnique(column="case_id", **meta("case_id_unique")),
        E.ExpectColumnValuesToBeInSet(column="target_differs", value_set=[True],
                                      **meta("target_differs")),
        E.ExpectColumnValuesToBeInSet(column="subject_in_prompt", value_set=[True],
                                      **meta("subject_in_prompt")),
        E.ExpectColumnValuesToBeInSet(column="conflicting_duplicate", value_set=[False],
                                      **meta("no_conflicting_duplicate")),
        E.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=limits.prompt_min_chars,
                                              max_value=limits.prompt_max_chars,
                                              **meta("prompt_length")),
        E.ExpectColumnValueLengthsToBeBetween(column="target_new",
                                              min_value=limits.target_min_chars,
                                              max_value=limits.target_max_chars,
                                              **meta("target_length")),
        E.ExpectColumnValuesToBeInSet(column="locality_among_edited", value_set=[False],
                                      **meta("locality_not_edited")),
    ]
    return gx.ExpectationSuite(name=name, expectations=expectations)


def _ephemeral_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    return gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    ))


# ---------------------------------------------------------------- running it


def validate_requests(requests: Sequence[EditRequest], limits: CheckLimits = CheckLimits(),
                      docs_dir: str | Path | None = None, source: str | Path | None = None) -> CheckReport:
    """Run the suite on ``requests`` (on a fresh ephemeral GX context) and report per record.

    No requests at all (an empty edit file) fail the gate: :class:`~kdpo.loaders.EditDataError`
    naming ``source``, the file they came from, is raised before GX runs.

    With ``docs_dir``, also writes ``validation.json`` (GX's validation result) and
    ``index.html``. The HTML is rendered here as one self-contained page (a table of the
    expectation results and one of the failing records): GX's own data docs do build
    offline from an ephemeral context (via a Checkpoint with ``UpdateDataDocsAction``), but
    their pages load jQuery, Bootstrap and Vega from CDNs, so they don't display properly
    without network access.
    """
    import great_expectations as gx

    requests = list(requests)
    if not requests:
        raise EditDataError(source, "no edit requests: an empty edit file fails the data gate")
    frame = requests_frame(requests)
    context = _ephemeral_context()
    batch_definition = (context.data_sources.add_pandas("edit_requests")
                        .add_dataframe_asset("requests")
                        .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(build_suite(limits))
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="edit_requests", data=batch_definition, suite=suite))
    result = validation.run(batch_parameters={"dataframe": frame.to_pandas()},
                            result_format={"result_format": "COMPLETE"})

    by_index: dict[int, dict] = {}
    summaries = []
    for item in result.results:
        config = item.expectation_config
        check = (config.meta or {}).get("check", config.type)
        raised = (item.exception_info or {}).get("raised_exception", False)
        indices = [int(i) for i in (item.result or {}).get("unexpected_index_list") or []]
        summaries.append({
            "check": check, "expectation": config.type, "column": config.kwargs.get("column"),
            "success": bool(item.success), "unexpected_count": len(indices),
            **({"exception": item.exception_info.get("exception_message")} if raised else {}),
        })
        for index in indices:
            entry = by_index.setdefault(index, {"index": index,
                                                "case_id": requests[index].case_id,
                                                "checks": [], "expectations": []})
            if check not in entry["checks"]:
                entry["checks"].append(check)
            entry["expectations"].append(config.type)

    failures = [by_index[i] for i in sorted(by_index)]
    statistics = {**dict(result.statistics), "n_records": len(requests),
                  "n_bad_records": len(failures), "n_good_records": len(requests) - len(failures)}
    report = CheckReport(success=bool(result.success), failures=failures, statistics=statistics,
                         expectations=summaries, validation_result=result.to_json_dict())
    if docs_dir is not None:
        write_docs(report, docs_dir)
    return report


def split_valid(requests: Sequence[EditRequest],
                report: CheckReport) -> tuple[list[EditRequest], list[EditRequest]]:
    """``(good, bad)``: the requests that passed every check and those quarantined."""
    requests = list(requests)
    if report.statistics.get("n_records") != len(requests):
        raise ValueError(f"report covers {report.statistics.get('n_records')} records, "
                         f"got {len(requests)} requests")
    bad = report.bad_indices
    return ([r for i, r in enumerate(requests) if i not in bad],
            [r for i, r in enumerate(requests) if i in bad])


# ---------------------------------------------------------------- docs


def write_docs(report: CheckReport, docs_dir: str | Path) -> Path:
    """Write ``validation.json`` and a self-contained ``index.html`` into ``docs_dir``."""
    out = Path(docs_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(
        json.dumps(report.validation_result, indent=2, default=str), encoding="utf-8")
    esc = lambda value: html.escape(str(value))  # noqa: E731
    status = "PASSED" if report.success else "FAILED"
    expectation_rows = "".join(
        f"<tr class={'ok' if e['success'] else 'bad'}><td>{esc(e['check'])}</td>"
        f"<td><code>{esc(e['expectation'])}</code></td><td>{esc(e['column'])}</td>"
        f"<td>{'pass' if e['success'] else 'FAIL'}</td><td>{e['unexpected_count']}</td></tr>"
        for e in report.expectations)
    failure_rows = "".join(
        f"<tr><td>{f['index']}</td><td>{esc(f['case_id'])}</td>"
        f"<td>{esc('; '.join(f['checks']))}</td></tr>" for f in report.failures
    ) or "<tr><td colspan=3>none</td></tr>"
    stats = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in report.statistics.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Edit request checks: {status}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:2em}}
td,th{{border:1px solid #999;padding:4px 8px;text-align:left}}tr.bad{{background:#fdd}}
tr.ok{{background:#dfd}}</style></head><body>
<h1>Edit request checks: {status}</h1><ul>{stats}</ul>
<h2>Expectations</h2><table><tr><th>check</th><th>expectation</th><th>column</th>
<th>result</th><th>failing records</th></tr>{expectation_rows}</table>
<h2>Failing records</h2><table><tr><th>index</th><th>case_id</th><th>failed checks</th></tr>
{failure_rows}</table></body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out
