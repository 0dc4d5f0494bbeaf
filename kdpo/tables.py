"""Result tables: the metrics a result is reported with, and the one renderer of text and Markdown tables
(the CLI, the refresh flow, its Prefect artifact, the HTML report's cells and the benchmarks use these)."""
from __future__ import annotations

HEADLINE = ("edit_success", "generalization", "locality", "portability", "fluency")  # teacher-forced
TABLE = (*HEADLINE, "edit_success_exact", "generalization_exact", "locality_exact")  # with the generation-based ones


def format_cell(value) -> str:
    """A table cell: floats to 3 decimals, None as "-"."""
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(headers: list[str], rows: list[list], markdown: bool = False) -> str:
    """A table of ``rows`` under ``headers``, each cell by :func:`format_cell`: plain aligned text, or with
    ``markdown`` a Markdown table."""
    cells = [[format_cell(v) for v in row] for row in rows]
    if markdown:
        line = lambda values: "| " + " | ".join(map(str, values)) + " |"  # noqa: E731
        return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, cells)])
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(str(v).ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(headers), line("-" * w for w in widths), *map(line, cells)])


def summary_table(summaries: list[dict]) -> str:
    """One row per run and schedule: immediate and final metrics, retention, cost."""
    headers = ["method", "edits", "schedule", *TABLE, "retention", "s/edit"]
    rows = []
    for s in summaries:
        for schedule in ("immediate", "final"):
            metrics = s[schedule]
            rows.append([
                s["method"], s["edits"], schedule, *(metrics.get(m) for m in TABLE),
                s["retention"] if schedule == "final" else None,
                s["seconds_per_edit"] if schedule == "final" else None,
            ])
    return format_table(headers, rows)


def schedule_table(summary: dict, markdown: bool = False) -> str:
    """One run's scores right after each edit (``immediate``) and after the last (``final``), a row each."""
    return format_table(["schedule", *(m.replace("_", " ") for m in TABLE)],
                        [[schedule, *(summary[schedule].get(m) for m in TABLE)] for schedule in ("immediate", "final")],
                        markdown)
