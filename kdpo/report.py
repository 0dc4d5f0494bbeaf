"""Refresh reports: PNG plots and one self-contained HTML page (plots inlined as base64, no scripts).

Pure: dicts in, files out. Three inputs, all written by this project:

* a sequential result (``SequentialResult.to_dict()``: ``kdpo edit --output``, the flow's ``edit/result.json``):
  radar of before / immediate / final, per-edit curves, a before/after table of the model's answers;
* a benchmark report (``bench/compare.py``'s ``report.json``: ``edits`` and ``rows``, each with a
  ``summary``): one radar series and one table row per method;
* a list of refreshes (``tasks.dashboards.recent_refreshes``): the headline metrics over time, keyed by model
  version, each gated metric against its promotion threshold.

A result read from a refresh's MLflow run carries its ``outcome`` (``tasks.dashboards.refresh_outcome``): the
model version, its alias, the gates with their thresholds, whether it was promoted, and where to look.

Scores are the teacher-forced metrics and, beside them, the generation-based ``_exact`` ones. The radar's
fluency axis is fluency divided by fluency before editing (1.0 = unchanged), so that every axis reads
"higher is better, about 1 at best"; the tables give the raw values.
"""
from __future__ import annotations

import base64
import html
import json
from itertools import cycle
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kdpo.evaluation import RequestScores, first_sentence, summarize
from kdpo.tables import TABLE, format_cell

DPI = 100
LINE_STYLES = ("-", "--", ":", "-.")  # overlapping curves (all at 1.0, say) stay distinguishable
MARKERS = ("o", "s", "^", "x", "D", "v", "P", "*")
RADAR_SIZE = (6.0, 6.0)  # inches; at DPI, 600 x 600 pixels
CURVE_SIZE = (9.0, 3.2)  # 900 x 320 pixels
PANEL_SIZE = (4.5, 2.2)  # one gated metric of the compare view: 450 x 220 pixels per panel, two panels a row
METRICS = TABLE  # the teacher-forced headline metrics, then the generation-based ones
LABELS = {
    "edit_success": "edit success", "generalization": "generalization", "locality": "locality",
    "portability": "portability", "fluency": "fluency (÷ before)", "edit_success_exact": "edit success (exact)",
    "generalization_exact": "generalization (exact)", "locality_exact": "locality (exact)",
}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; padding: 0 1.5rem; max-width: 1100px; color: #1d232a; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
.table { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f5f7; overflow-wrap: break-word; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
#refreshes { table-layout: fixed; width: 100%; font-size: 0.72rem; } #refreshes th, #refreshes td { padding: 0.2rem 0.25rem; }
#refreshes td { overflow-wrap: anywhere; } #refreshes td.num { overflow-wrap: normal; }
#refreshes th:nth-child(2) { width: 6.5%; } #refreshes th:nth-child(3) { width: 13%; }
#refreshes th:last-child { width: 10%; }
td.held, td.passed { color: #1a7f37; font-weight: 600; } td.lost, td.failed { color: #cf222e; font-weight: 600; }
figure { margin: 1rem 0; } img { max-width: 100%; } figcaption { font-size: 0.8rem; color: #57606a; } .meta { color: #57606a; }
pre { background: #f6f8fa; padding: 0.75rem; font-size: 0.8rem; overflow-x: auto; }
"""


class ReportInputError(ValueError):
    """The input is not a result, benchmark or refresh list this module can report on."""


# --- data -------------------------------------------------------------------------------------


def input_kind(data) -> str:
    """``"result"`` (a sequential result) or ``"bench"`` (a benchmark report); else ReportInputError."""
    if isinstance(data, dict) and "records" in data and "summary" in data:
        return "result"
    if isinstance(data, dict) and isinstance(data.get("rows"), list) and all("summary" in r for r in data["rows"]):
        return "bench"
    keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
    raise ReportInputError(
        f"not a sequential result (needs fields 'summary' and 'records') nor a benchmark report "
        f"(needs 'rows', each with 'summary'); got {keys}"
    )


def radar_point(scores: dict, fluency_before: float | None) -> dict[str, float | None]:
    """The radar's values: the scores as they are, fluency relative to before editing."""
    point = {metric: scores.get(metric) for metric in METRICS}
    fluency = scores.get("fluency")
    point["fluency"] = fluency / fluency_before if fluency is not None and fluency_before else None
    return point


def baseline_summary(result: dict) -> dict[str, float | None]:
    """Mean scores of the model before editing (target_new accuracy, locality 1.0 by definition)."""
    return summarize([RequestScores(**scores) for scores in result["baseline"]])


def result_series(result: dict) -> dict[str, dict[str, float | None]]:
    """Radar series of a sequential result: before editing, immediate and final."""
    summary = result["summary"]
    return {
        "before editing": radar_point(baseline_summary(result), summary["fluency_before"]),
        "immediate": radar_point(summary["immediate"], summary["fluency_before"]),
        "final": radar_point(summary["final"], summary["fluency_before"]),
    }


def running_mean(values: list[float]) -> list[float]:
    """Mean of the first 1, 2, ... n values."""
    return (np.cumsum(values) / np.arange(1, len(values) + 1)).tolist()


def gate_results(thresholds: dict[str, float], summary: dict) -> list[dict]:
    """Each promotion gate (``min_X`` on the final score X, ``max_fluency_drop`` on ``fluency_drop``) with the
    value it was decided on and whether it passed; a value not measured counts as 0, as in the decision."""
    rows = []
    for gate, threshold in thresholds.items():
        metric = gate.split("_", 1)[1]
        value = summary.get(metric) if metric == "fluency_drop" else summary.get("final", {}).get(metric)
        passed = (value or 0) >= threshold if gate.startswith("min_") else (value or 0) <= threshold
        rows.append({"gate": gate, "metric": metric, "value": value, "threshold": threshold, "passed": passed})
    return rows


def refresh_label(refresh: dict) -> str:
    """A refresh's key in the compare view: its model version (``v3``), else its start time."""
    return f"v{refresh['model_version']}" if refresh.get("model_version") else refresh["started"]


# --- plots ------------------------------------------------------------------------------------


def radar_png(series: dict[str, dict[str, float | None]], path: Path, title: str) -> Path:
    """A radar chart, one polygon per series, over the metrics any series has; missing points are gaps."""
    metrics = [m for m in METRICS if any(point.get(m) is not None for point in series.values())]
    angles = np.linspace(0, 2 * np.pi, len(metrics), endpoint=False).tolist()
    values = {name: [np.nan if p.get(m) is None else p[m] for m in metrics] for name, p in series.items()}
    top = max(1.0, np.nanmax([v for vs in values.values() for v in vs] + [0.0]))
    figure = Figure(figsize=RADAR_SIZE, dpi=DPI, layout="constrained")
    axes = figure.add_subplot(projection="polar")
    for name, points in values.items():
        (line,) = axes.plot(angles + angles[:1], points + points[:1], marker="o", linewidth=1.5, label=name)
        if not np.isnan(points).any():
            axes.fill(angles + angles[:1], points + points[:1], alpha=0.12, color=line.get_color())
    axes.set_xticks(angles, [LABELS[m] for m in metrics])
    axes.tick_params(axis="x", pad=12)
    axes.set_rlabel_position(180 / max(len(metrics), 1))  # between the first two axes
    axes.set_ylim(0, float(np.ceil(top * 4) / 4))
    axes.set_title(title, pad=18)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, -0.16), ncols=min(len(values), 3), fontsize=8, frameon=False)
    figure.savefig(path, dpi=DPI)
    return path


def curves_png(x: list[str] | list[int], lines: dict[str, list], path: Path, title: str, ylabel: str,
               bars: tuple[str, list] | None = None, unit_range: bool = True) -> Path:
    """Lines (and optional bars) over edit indices, or over labels (one tick each); None values are gaps."""
    figure = Figure(figsize=CURVE_SIZE, dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    if x and isinstance(x[0], str):
        x, labels = list(range(len(x))), x
        axes.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
    else:
        axes.set_xlabel("edit index")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if bars is not None:
        axes.bar(x, [np.nan if v is None else v for v in bars[1]], color="#c8d1dc", label=bars[0])
    for (name, values), style, marker in zip(lines.items(), cycle(LINE_STYLES), cycle(MARKERS)):
        axes.plot(x, [np.nan if v is None else v for v in values], linestyle=style, marker=marker, markersize=4,
                  label=name)
    if unit_range:  # scores in [0, 1]; a fluency ratio may pass 1
        axes.set_ylim(-0.03, max([1.05] + [v + 0.05 for vs in lines.values() for v in vs if v is not None]))
    axes.set_title(title, fontsize=10)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    figure.savefig(path, dpi=DPI)
    return path


def result_plots(result: dict, out_dir: Path) -> dict[str, Path]:
    """The result's PNGs: radar, edit success and retention, locality, weight drift."""
    records, final = result["records"], result["final"]
    index = [r["index"] for r in records]
    final_es = [f["edit_success"] for f in final]
    summary = result["summary"]
    drift_modules = sorted({module for r in records for module in r.get("drift") or {}})
    return {
        "radar": radar_png(result_series(result), out_dir / "radar.png",
                           f"{summary['method']}: {summary['edits']} sequential edits"),
        "edits": curves_png(
            index,
            {"immediate edit success": [r["immediate"]["edit_success"] for r in records],
             "final edit success (held)": final_es,
             "retention of edits 0..i at the end": running_mean(final_es),
             "immediate generalization": [r["immediate"]["generalization"] for r in records],
             "final generalization": [f["generalization"] for f in final],
             "immediate edit success (exact)": [r["immediate"].get("edit_success_exact") for r in records],
             "final edit success (exact)": [f.get("edit_success_exact") for f in final]},
            out_dir / "edits.png", "Edit held: right after its edit and after the last edit", "score",
        ),
        "locality": curves_png(
            index,
            {"immediate locality": [r["immediate"]["locality"] for r in records],
             "final locality": [f["locality"] for f in final],
             "immediate locality (exact)": [r["immediate"].get("locality_exact") for r in records],
             "final locality (exact)": [f.get("locality_exact") for f in final]},
            out_dir / "locality.png", "Locality drift: locality prompts unchanged from before editing", "share",
        ),
        "drift": curves_png(
            index,
            {f"{module}: distance from original": [(r.get("drift") or {}).get(module) for r in records]
             for module in drift_modules},
            out_dir / "drift.png", "Weight drift (Frobenius norm)", "norm",
            bars=("this edit's update (delta norm)", [r["delta_norm"] for r in records]), unit_range=False,
        ),
    }


def bench_plots(bench: dict, out_dir: Path) -> dict[str, Path]:
    """The benchmark's radar: one series per method, final scores."""
    series = {r["method"]: radar_point(r["summary"]["final"], r["summary"]["fluency_before"]) for r in bench["rows"]}
    return {"radar": radar_png(series, out_dir / "radar.png", f"{bench['edits']} sequential edits, final")}


def gates_png(labels: list[str], gates: list[list[dict]], path: Path, title: str) -> Path:
    """One panel per gated metric: each refresh's value, and its threshold as a horizontal dashed line."""
    metrics = list(dict.fromkeys(row["metric"] for rows in gates for row in rows))
    columns = 2
    panel_rows = max(1, -(-len(metrics) // columns))
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * panel_rows), dpi=DPI, layout="constrained")
    x = np.arange(len(labels))
    for i, metric in enumerate(metrics):
        axes = figure.add_subplot(panel_rows, columns, i + 1)
        by_refresh = [next((row for row in rows if row["metric"] == metric), None) for rows in gates]
        values = [np.nan if row is None or row["value"] is None else row["value"] for row in by_refresh]
        thresholds = [np.nan if row is None else row["threshold"] for row in by_refresh]
        axes.plot(x, values, marker="o", markersize=4, label="value")
        axes.hlines(thresholds, x - 0.5, x + 0.5, colors="#cf222e", linestyles="--", label="gate")
        axes.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
        axes.set_title(LABELS.get(metric, column(metric)), fontsize=9)
        axes.grid(alpha=0.3)
        if i == 0:
            axes.legend(fontsize=7, frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=DPI)
    return path


def compare_plots(refreshes: list[dict], out_dir: Path) -> dict[str, Path]:
    """Headline metrics over the refreshes (oldest first), each gated metric against its threshold, and a
    radar of the last six refreshes; keyed by :func:`refresh_label`."""
    labels = [refresh_label(r) for r in refreshes]
    points = [radar_point(r["summary"].get("final", {}), r["summary"].get("fluency_before")) for r in refreshes]
    lines = {LABELS[m]: [p[m] for p in points] for m in METRICS if any(p[m] is not None for p in points)}
    lines["retention"] = [r["summary"].get("retention") for r in refreshes]
    trend = curves_png(labels, lines, out_dir / "trend.png", "Headline metrics after each refresh's last edit", "score")
    gates = gates_png(labels, [r["gates"] for r in refreshes], out_dir / "gates.png",
                      "Gated metrics after the last edit; dashed: the refresh's promotion threshold")
    radar = dict(list(zip(labels, points))[-6:])
    return {"trend": trend, "gates": gates, "radar": radar_png(radar, out_dir / "radar.png", "Recent refreshes, final")}


# --- HTML -------------------------------------------------------------------------------------


def column(metric: str) -> str:
    """A metric's name as a table header."""
    return metric.replace("_", " ")


def html_table(headers: list[str], rows: list[list], table_id: str, classes: list[list[str]] | None = None) -> str:
    """An HTML table; numbers right-aligned with 3 decimals, None as '-'; optional per-cell classes."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, value in enumerate(row):
            css = " ".join(filter(None, ["num" if isinstance(value, (int, float)) else "",
                                         classes[i][j] if classes else ""]))
            attribute = f' class="{css}"' if css else ""
            cells.append(f"<td{attribute}>{html.escape(format_cell(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="table"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def image_html(path: Path, caption: str) -> str:
    """A figure with the PNG inlined as a data URI."""
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def page(title: str, sections: list[tuple[str, str]], meta: str = "") -> str:
    """The whole document: a title, a meta line, and (heading, HTML) sections."""
    body = "".join(f"<h2>{html.escape(heading)}</h2>{content}" for heading, content in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="meta">{html.escape(meta)}</p>{body}</body></html>')


def outcome_rows(outcome: dict) -> list[tuple[str, str, str | None]]:
    """What a refresh registered and where to look, as (what, text, link or None) rows: links only where a
    server serves them (never ``file://``); for local stores, the ids and the command that opens the MLflow UI."""
    links = outcome["links"]
    version = f"{outcome['model_name']} v{outcome['version']}" if outcome["version"] else "nothing registered"
    flow_run = outcome["flow_run_id"] or "-"
    rows = [
        ("model version", version, links["model_version"]),
        ("alias", ", ".join(outcome["aliases"]) or "none", None),
        ("promoted", "yes: champion" if outcome["promoted"] else f"no: {outcome['why_not']}", None),
        ("MLflow run", outcome["run_id"], links["mlflow_run"]),
        ("Prefect flow run", flow_run if links["prefect_flow_run"] else f"{flow_run} (Prefect's ephemeral API)",
         links["prefect_flow_run"]),
        ("report", "report/report.html in the MLflow run's artifacts", links["report"]),
        ("comparison", "report/compare/report.html in the MLflow run's artifacts", links["compare"]),
    ]
    if outcome["mlflow_ui"]:
        rows.append(("MLflow UI", outcome["mlflow_ui"], None))
    return rows


def link_html(text: str, href: str | None) -> str:
    """A link, or the text as code where there is nothing to link to."""
    return f'<a href="{html.escape(href)}">{html.escape(text)}</a>' if href else f"<code>{html.escape(text)}</code>"


def gates_table(gates: list[dict]) -> str:
    """The promotion gates (see :func:`gate_results`): measured value, threshold, passed or failed."""
    rows = [[g["gate"], g["value"], g["threshold"], "passed" if g["passed"] else "FAILED"] for g in gates]
    classes = [["", "", "", "passed" if g["passed"] else "failed"] for g in gates]
    return html_table(["gate", "measured", "threshold", "result"], rows, "gates", classes)


def outcome_section(outcome: dict | None) -> list[tuple[str, str]]:
    """The refresh's registry outcome and its gates, for a result read from a refresh's run (none otherwise)."""
    if not outcome:
        return []
    rows = "".join(f"<tr><td>{html.escape(what)}</td><td>{link_html(text, href)}</td></tr>"
                   for what, text, href in outcome_rows(outcome))
    return [("Outcome", f'<div class="table"><table id="outcome"><tbody>{rows}</tbody></table></div>'
             + gates_table(outcome["gates"]))]


def answers_table(result: dict) -> str:
    """One row per edit: prompt, old and new answer, what the model answered before and after, held."""
    answers = result.get("answers") or [{} for _ in result["records"]]
    rows, classes = [], []
    for record, answer in zip(result["records"], answers):
        rows.append([record["index"], record["case_id"], answer.get("prompt"), answer.get("ground_truth"),
                     answer.get("target_new"), first_sentence(answer.get("before", "")) or None,
                     first_sentence(answer.get("after", "")) or None, "held" if record["held"] else "lost"])
        classes.append([""] * 7 + ["held" if record["held"] else "lost"])
    headers = ["#", "case", "prompt", "old answer", "new target", "answered before", "answered after", "after last edit"]
    return html_table(headers, rows, "answers", classes)


def render_result(result: dict, out_dir: Path, title: str | None = None) -> str:
    """The HTML report of one sequential result; writes its PNGs into ``out_dir``."""
    summary = result["summary"]
    plots = result_plots(result, out_dir)
    before = baseline_summary(result)
    scores = [["before editing", *(before[m] for m in METRICS)]]
    scores += [[schedule, *(summary[schedule].get(m) for m in METRICS)] for schedule in ("immediate", "final")]
    costs = [[summary["retention"], summary["fluency_before"], summary["seconds_per_edit"], summary["steps_per_edit"],
              summary["reached_stop_rule"]]]
    unmeasured = [LABELS[m] for m in METRICS if all(row[1 + METRICS.index(m)] is None for row in scores)]
    sections = [
        *outcome_section(result.get("outcome")),
        ("Summary", html_table(["schedule", *map(column, METRICS)], scores, "summary")
         + html_table(["retention", "fluency before", "s/edit", "steps/edit", "reached stop rule"], costs, "costs")
         + f"<p>{html.escape(result['schedule'])}</p>"),
        ("Radar", image_html(plots["radar"], "before editing, right after each edit (immediate), after the last edit "
                             "(final); fluency relative to before editing"
                             + (f"; not measured: {', '.join(unmeasured)}" if unmeasured else ""))),
        ("Per-edit curves", image_html(plots["edits"], "edit success and generalization of each edit right after it "
                                       "and after the last edit, teacher-forced and exact (greedy generation); "
                                       "retention: share of edits 0..i still held at the end")
         + image_html(plots["locality"], "locality of each edit's locality prompts right after the edit and at the "
                      "end, teacher-forced and exact")
         + image_html(plots["drift"], "norm of each edit's weight update; distance of each edited matrix from the "
                      "original where the result records it")),
        *memory_section(summary.get("memory")),
        ("Before and after each edit", answers_table(result)),
        ("Settings", f"<pre>{html.escape(json.dumps(result['config'], indent=2))}</pre>"),
    ]
    title = title or f"Knowledge refresh: {summary['edits']} sequential edits with {summary['method']}"
    return page(title, sections, "Scores are EasyEdit's teacher-forced metrics and their exact-match counterparts "
                                 "on greedy generations (see protocol in the result).")


def memory_section(memory: dict | None) -> list[tuple[str, str]]:
    """The edit memory's size and use, for a result whose edits live in it (none otherwise)."""
    if not memory:
        return []
    rate = "-" if memory["gate_rate"] is None else f"{memory['gate_rate']:.1%}"
    row = [[memory["slots"], memory["facts"], memory["rank"], ", ".join(memory["modules"]),
            f"{memory['bytes'] / 2**20:.2f} MiB", f"{(memory['bytes_per_edit'] or 0) / 1024:.1f} KiB", rate]]
    headers = ["subjects (slots)", "facts", "rank", "modules", "size", "per edit", "gate opened"]
    return [("Edit memory", html_table(headers, row, "memory") + "<p>gate opened: share of the sequences of the "
             "final evaluation in which at least one slot's subject was mentioned</p>")]


def render_bench(bench: dict, out_dir: Path) -> str:
    """The HTML report of a benchmark: one row and one radar series per method."""
    plots = bench_plots(bench, out_dir)
    rows = [
        [r["method"], r["summary"]["immediate"]["edit_success"], *(r["summary"]["final"].get(m) for m in METRICS),
         r["summary"]["retention"], r["summary"]["fluency_before"], r["summary"]["seconds_per_edit"]]
        for r in bench["rows"]
    ]
    headers = ["method", "edit success immediate", *(f"{column(m)} final" for m in METRICS), "retention",
               "fluency before", "s/edit"]
    sections = [("Methods", html_table(headers, rows, "methods")),
                ("Radar", image_html(plots["radar"], "final scores per method; fluency relative to before editing"))]
    return page(f"Benchmark: {bench['edits']} sequential edits", sections, bench.get("schedule", ""))


def render_compare(refreshes: list[dict], out_dir: Path) -> str:
    """The HTML comparison of refreshes (oldest first), keyed by model version: a table, the headline metrics
    over the refreshes and each gated metric against its threshold."""
    if not refreshes:
        raise ReportInputError("no refreshes to compare (no finished evaluate step in the experiment)")
    plots = compare_plots(refreshes, out_dir)
    rows = [
        [refresh_label(r), r["started"], r["name"], r.get("method"), r["summary"].get("edits"),
         *(r["summary"].get("final", {}).get(m) for m in METRICS), r["summary"].get("retention"),
         r["summary"].get("seconds_per_edit"),
         ", ".join(g["gate"] for g in r["gates"] if not g["passed"]) or "all passed", r["run_id"]]
        for r in refreshes
    ]
    headers = ["version", "started (UTC)", "run", "method", "edits", *(f"{column(m)} final" for m in METRICS),
               "retention", "s/edit", "failed gates", "run id"]
    sections = [("Refreshes", html_table(headers, rows, "refreshes")),
                ("Gates", image_html(plots["gates"], "each gated metric after the refresh's last edit; dashed: the "
                                     "threshold the refresh was gated with")),
                ("Over time", image_html(plots["trend"], "final scores of each refresh; fluency relative to before")),
                ("Radar", image_html(plots["radar"], "the last six refreshes, final scores"))]
    return page(f"Knowledge refreshes: the last {len(refreshes)}", sections, "keyed by model version (v3), or by "
                "start time for a refresh that registered nothing")


def write_report(html_text: str, out_dir: Path) -> Path:
    """``out_dir/report.html``."""
    path = Path(out_dir) / "report.html"
    path.write_text(html_text)
    return path


def render(data, out_dir: str | Path) -> Path:
    """Write the report of a result or benchmark dict (see ``input_kind``) into ``out_dir``; returns the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    renderer = {"result": render_result, "bench": render_bench}[input_kind(data)]
    return write_report(renderer(data, out_dir), out_dir)
