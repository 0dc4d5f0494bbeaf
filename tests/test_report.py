"""Reports: PNGs of the expected size, a self-contained HTML page that headless Chromium renders (a non-blank
screenshot, the expected headings and rows in its DOM), the CLI, the refresh flow's report step in MLflow with its
outcome (version, alias, gates, links: http ones through a real ``mlflow server``, none to ``file://``), and the
compare view keyed by model version with its gates' thresholds."""
import base64
import json
import os
import urllib.request
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from gates import RELAXED
from PIL import Image, ImageStat

from kdpo.cli import main
from kdpo.editing import make_config, run_sequential
from kdpo.modeling import load_model
from kdpo.report import (
    CURVE_SIZE, DPI, METRICS, PANEL_SIZE, RADAR_SIZE, ReportInputError, gate_results, gates_png, input_kind, outcome_rows,
    render, render_compare, render_result, running_mean,
)
from tasks.dashboards import prefect_ui_url, recent_refreshes, refresh_links, refresh_outcome, run_result, unflatten
from tasks.refresh import summary_markdown
from tasks.tracking import flat_metrics

EDITS = 3
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
WINDOW = (1200, 2400)


def pixels(size: tuple[float, float]) -> tuple[int, int]:
    return round(size[0] * DPI), round(size[1] * DPI)


def sequential(world, requests, method: str) -> dict:
    model, tokenizer = load_model(world.path)
    config = make_config(method, overrides={"max_steps": "60"})
    return run_sequential(model, tokenizer, requests[:EDITS], method, config, world.corpus(), progress=False).to_dict()


@pytest.fixture(scope="module")
def result(tiny_world, tiny_requests):
    return sequential(tiny_world, tiny_requests, "kdpo")


@pytest.fixture(scope="module")
def report(result, tmp_path_factory):
    return render(result, tmp_path_factory.mktemp("report"))


class Outline(HTMLParser):
    """Headings, body rows of each table (cell texts, by table id) and image sources of an HTML document."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.rows, self.images = [], {}, []
        self._table, self._row, self._text, self._body = None, None, None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
            self.rows[self._table] = []
        elif tag == "tbody":
            self._body = True
        elif tag == "tr" and self._body:
            self._row = []
        elif tag in ("h1", "h2", "td"):
            self._text = ""
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self._text is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag in ("h1", "h2"):
            self.headings.append(self._text.strip())
        elif tag == "td" and self._row is not None:
            self._row.append(self._text.strip())
        elif tag == "tr" and self._row is not None:
            self.rows[self._table].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._body = False
        if tag in ("h1", "h2", "td"):
            self._text = None


def test_pngs_are_images_of_the_expected_size(report):
    sizes = {"radar.png": pixels(RADAR_SIZE), **{name: pixels(CURVE_SIZE) for name in ("edits.png", "locality.png",
                                                                                      "drift.png")}}
    for name, size in sizes.items():
        with Image.open(report.parent / name) as image:
            image.verify()
        with Image.open(report.parent / name) as image:
            assert image.format == "PNG" and image.size == size, name
            assert max(ImageStat.Stat(image.convert("L")).stddev) > 10, f"{name} looks blank"


def test_html_is_self_contained_with_expected_sections(report, result):
    text = report.read_text()
    assert "<script" not in text and not re.search(r"""(src|href)=["']https?:""", text)
    outline = Outline(text)
    assert outline.headings[0] == "Knowledge refresh: 3 sequential edits with kdpo"
    assert outline.headings[1:] == ["Summary", "Radar", "Per-edit curves", "Edit memory", "Before and after each edit",
                                    "Settings"]
    memory = result["summary"]["memory"]
    assert outline.rows["memory"][0][:3] == [str(memory["slots"]), str(memory["facts"]), str(memory["rank"])]
    assert len(outline.images) == 4 and all(src.startswith("data:image/png;base64,") for src in outline.images)
    assert base64.b64decode(outline.images[0].split(",", 1)[1]) == (report.parent / "radar.png").read_bytes()
    answers = outline.rows["answers"]
    assert [row[1] for row in answers] == [r["case_id"] for r in result["records"]]
    assert [row[4] for row in answers] == [a["target_new"] for a in result["answers"]]
    assert [row[-1] for row in answers] == ["held" if r["held"] else "lost" for r in result["records"]]
    assert [row[0] for row in outline.rows["summary"]] == ["before editing", "immediate", "final"]
    assert outline.rows["summary"][2][1] == f"{result['summary']['final']['edit_success']:.3f}"


def test_result_keeps_answers_before_and_after(result, tiny_requests):
    answers = result["answers"]
    assert [a["prompt"] for a in answers] == [r.prompt for r in tiny_requests[:EDITS]]
    assert all(a["before"] and a["after"] for a in answers)
    held = [a for a, r in zip(answers, result["records"]) if r["held"]]
    assert held and any(a["after"].startswith(a["target_new"]) for a in held)


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def test_report_renders_in_headless_chromium(report, result, tmp_path):
    if chromium() is None:  # CI installs it (.ci/run): there a missing browser is a failure, not a skip
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no chromium binary (Debian: apt-get install chromium)")
    base = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", report.as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as image:
        assert image.size == WINDOW
        assert max(ImageStat.Stat(image.convert("L")).stddev) > 20, "the screenshot is blank"
    dom = subprocess.run([*base, "--dump-dom", report.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    outline = Outline(dom)
    assert "Before and after each edit" in outline.headings and len(outline.images) == 4
    assert [row[1] for row in outline.rows["answers"]] == [r["case_id"] for r in result["records"]]


def test_bench_report_has_a_row_and_a_series_per_method(result, tiny_world, tiny_requests, tmp_path):
    ft_m = sequential(tiny_world, tiny_requests, "ft-m")
    bench = {"edits": EDITS, "schedule": result["schedule"],
             "rows": [{"method": r["summary"]["method"], "summary": r["summary"]} for r in (result, ft_m)]}
    assert input_kind(bench) == "bench"
    path = render(bench, tmp_path)
    outline = Outline(path.read_text())
    assert [row[0] for row in outline.rows["methods"]] == ["kdpo", "ft-m"]
    with Image.open(tmp_path / "radar.png") as image:
        assert image.size == pixels(RADAR_SIZE)


def test_unknown_input_names_the_fields_it_needs():
    with pytest.raises(ReportInputError, match="'summary' and 'records'"):
        input_kind({"rows": [{"method": "kdpo"}]})


def test_rendering_imports_neither_mlflow_nor_prefect():
    code = "import sys, kdpo.report, kdpo.cli; print(sorted({'mlflow', 'prefect'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_small_helpers():
    assert running_mean([1.0, 0.0, 1.0, 1.0]) == [1.0, 0.5, 2 / 3, 0.75]
    nested = {"final": {"edit_success": 1.0, "locality": 0.5}, "retention": 1.0}
    assert unflatten(flat_metrics("eval", nested) | {"edit/steps": 3.0}, "eval") == nested


def test_cli_report_of_a_result_file(result, tmp_path, capsys):
    source = tmp_path / "result.json"
    source.write_text(json.dumps(result))
    assert main(["report", str(source), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "report.html")
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def refreshes(tiny_world, tmp_path_factory):
    """A refresh of the tiny world in a fresh MLflow store (gates relaxed: promoted), then a later one that only
    evaluates (the real evaluate task under a new parent run, with the default gates: a second point in time
    that registered nothing)."""
    from flows.knowledge_refresh import DEFAULT_GATES, knowledge_refresh
    from tasks.refresh import evaluate_refresh

    folder = tmp_path_factory.mktemp("refreshes")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDPO_HOME", str(folder / "kdpo-home"))
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        first = knowledge_refresh(model=str(tiny_world.path), limit=2, tracking_uri=uri, model_name="reported",
                                  artifact_root=str(folder / "artifacts"), settings={"max_steps": 150}, gates=RELAXED)
        with mlflow.start_run(run_name="evaluation only") as later:
            mlflow.log_param("method", "kdpo")
        evaluate_refresh.fn(first["summary"] | {"retention": 0.5}, later.info.run_id, DEFAULT_GATES)
    return uri, first, later.info.run_id


def test_refresh_flow_logs_report_metrics_and_description(refreshes):
    uri, refresh, _ = refreshes
    client = MlflowClient(uri)
    parent = client.get_run(refresh["run_id"])
    assert parent.info.run_name == f"reported v{refresh['version']}: 2 kdpo edits from edits.jsonl"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/radar.png", "report/edits.png", "report/compare"} <= logged
    assert refresh["reports"]["report"].endswith(f"{parent.info.run_id}/artifacts/report/report.html")
    report = Path(mlflow.artifacts.download_artifacts(refresh["reports"]["report"]))
    assert "Before and after each edit" in Outline(report.read_text()).headings
    compare = Path(mlflow.artifacts.download_artifacts(refresh["reports"]["compare"]))
    assert [row[-1] for row in Outline(compare.read_text()).rows["refreshes"]] == [refresh["run_id"]]
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "edit/final/edit_success")] == [0, 1]
    assert parent.data.metrics["eval/final/edit_success"] == refresh["summary"]["final"]["edit_success"]
    description = client.get_model_version("reported", refresh["version"]).description
    assert "| final |" in description and refresh["run_id"] in description


def expected_gates(refresh: dict) -> list[list[str]]:
    """The gates table the refresh's report should show: each gate, measured value, threshold, result."""
    from flows.knowledge_refresh import DEFAULT_GATES

    final = refresh["summary"]["final"]
    drop = refresh["summary"]["fluency_before"] - final["fluency"]
    rows = []
    for gate, threshold in (DEFAULT_GATES | RELAXED).items():
        metric = gate.split("_", 1)[1]
        value = drop if metric == "fluency_drop" else final[metric]
        rows.append([gate, f"{value:.3f}", f"{threshold:.3f}", "passed" if refresh["gates"]["checks"][
            "fluency" if metric == "fluency_drop" else metric] else "FAILED"])
    return rows


def test_report_shows_outcome_gates_and_no_file_links(refreshes):
    """The refresh's own report, read back from MLflow: version, alias, promotion, gates with the thresholds it
    ran with; on a sqlite store the ids and the `mlflow ui` command, never a file:// link."""
    uri, refresh, _ = refreshes
    text = Path(mlflow.artifacts.download_artifacts(refresh["reports"]["report"])).read_text()
    outline = Outline(text)
    assert outline.headings[1] == "Outcome"
    outcome = dict(outline.rows["outcome"])
    assert outcome["model version"] == f"reported v{refresh['version']}" and refresh["promoted"]
    assert outcome["alias"] == "champion, challenger" and outcome["promoted"] == "yes: champion"
    assert outcome["MLflow run"] == refresh["run_id"]
    flow_run = MlflowClient(uri).get_run(refresh["run_id"]).data.tags["prefect.flow_run_id"]
    assert outcome["Prefect flow run"] == f"{flow_run} (Prefect's ephemeral API)"
    assert outcome["MLflow UI"] == f"mlflow ui --backend-store-uri {uri}"
    assert outline.rows["gates"] == expected_gates(refresh)
    assert "file://" not in text and "<a href" not in text


def test_refresh_markdown_artifact_shows_outcome_without_file_links(refreshes):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    uri, refresh, _ = refreshes
    with get_client(sync_client=True) as prefect:  # newest first: a long-lived Prefect home holds hundreds of them
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["knowledge-refresh"])),
                                           sort=ArtifactSort.CREATED_DESC, limit=10)
    [markdown] = [a.data for a in artifacts if f"| MLflow run | `{refresh['run_id']}` |" in a.data]
    assert f"| model version | `reported v{refresh['version']}` |" in markdown
    assert "| alias | `champion, challenger` |" in markdown and "| promoted | `yes: champion` |" in markdown
    assert f"| MLflow UI | `mlflow ui --backend-store-uri {uri}` |" in markdown
    for gate, value, threshold, result in expected_gates(refresh):
        assert f"| {gate} | {value} | {float(threshold):g} | {result if result == 'passed' else '**FAILED**'} |" in markdown
    assert "file://" not in markdown and "](" not in markdown


@pytest.fixture(scope="module")
def http_server(refreshes, tmp_path_factory):
    """A real ``mlflow server`` on the refreshes' store."""
    from servers import start_mlflow_server

    server = start_mlflow_server(refreshes[0], tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


def test_outcome_links_through_an_http_tracking_server(refreshes, http_server, tmp_path):
    """The same refresh read through a real ``mlflow server`` on its store, with a Prefect API configured: the
    report and the artifact link the run, the reports, the model version and the flow run over http."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    uri, refresh, _ = refreshes
    server = http_server
    client = MlflowClient(server.url)
    parent = client.get_run(refresh["run_id"])
    with temporary_settings({PREFECT_API_URL: "http://prefect.example:4200/api"}):
        outcome = refresh_outcome(client, parent)
    with urllib.request.urlopen(f"{server.url}/ajax-api/2.0/mlflow/model-versions/get?name=reported&version="
                                f"{refresh['version']}", timeout=60) as answer:
        assert json.load(answer)["model_version"]["version"] == refresh["version"]
    with urllib.request.urlopen(f"{server.url}/", timeout=60) as answer:  # the UI the # routes live in
        assert answer.status == 200
    run_url = f"{server.url}/#/experiments/{parent.info.experiment_id}/runs/{refresh['run_id']}"
    flow_run = parent.data.tags["prefect.flow_run_id"]
    assert outcome["links"] == {
        "mlflow_run": run_url, "report": f"{run_url}/artifacts/report/report.html",
        "compare": f"{run_url}/artifacts/report/compare/report.html",
        "model_version": f"{server.url}/#/models/reported/versions/{refresh['version']}",
        "prefect_flow_run": f"http://prefect.example:4200/runs/flow-run/{flow_run}",
    }
    assert outcome["mlflow_ui"] is None and outcome["aliases"] == ["champion", "challenger"]
    markdown = summary_markdown(refresh["summary"], outcome)
    assert f"| MLflow run | [{refresh['run_id']}]({run_url}) |" in markdown
    assert f"| model version | [reported v{refresh['version']}]({outcome['links']['model_version']}) |" in markdown
    assert f"| Prefect flow run | [{flow_run}](http://prefect.example:4200/runs/flow-run/{flow_run}) |" in markdown
    assert "mlflow ui" not in markdown and "file://" not in markdown
    result = run_result(MlflowClient(uri), refresh["run_id"]) | {"outcome": outcome}
    text = render_result(result, tmp_path)
    assert f'<a href="{run_url}">{refresh["run_id"]}</a>' in text and "file://" not in text
    with temporary_settings({PREFECT_UI_URL: "https://prefect.example/ui"}):
        assert prefect_ui_url() == "https://prefect.example/ui"


def test_refresh_flow_silences_mlflow_run_links_and_progress_bars(http_server, tmp_path):
    """On an http server MLflow prints "View run ... at: URL" at every run's end and a tqdm bar for every
    artifact download; neither once the refresh flow's module is imported (which also turns Prefect's
    ephemeral server telemetry off)."""
    code = ("import os, sys, mlflow\nif sys.argv[1] == 'flow': import flows.knowledge_refresh\n"
            f"mlflow.set_tracking_uri({http_server.url!r}); mlflow.set_experiment('quiet')\n"
            "with mlflow.start_run() as run: mlflow.log_text('x', 'x.txt')\n"
            "mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=sys.argv[2])\n"
            "print('analytics', os.environ.get('PREFECT_SERVER_ANALYTICS_ENABLED'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_SERVER_ANALYTICS"))}
    plain, flow = [subprocess.run([sys.executable, "-c", code, which, str(tmp_path)], capture_output=True, text=True,
                                  check=True, env=env, timeout=300) for which in ("plain", "flow")]
    assert "View run" in plain.stdout and "Downloading artifacts" in plain.stderr  # the checks can fail
    assert "View run" not in flow.stdout + flow.stderr and "Downloading artifacts" not in flow.stdout + flow.stderr
    assert "analytics false" in flow.stdout


def test_outcome_rows_say_why_a_version_was_not_promoted():
    links = refresh_links("sqlite:///m.db", "1", "r1", "m", "2", "f1", None)
    outcome = {"model_name": "m", "version": "2", "aliases": ["challenger"], "promoted": False,
               "why_not": "rejected by its gates: locality 0.500 fails min_locality 0.9", "run_id": "r1",
               "flow_run_id": "f1", "links": links, "mlflow_ui": "mlflow ui --backend-store-uri sqlite:///m.db",
               "gates": gate_results({"min_locality": 0.9}, {"final": {"locality": 0.5}})}
    rows = {what: (text, href) for what, text, href in outcome_rows(outcome)}
    assert rows["alias"] == ("challenger", None)
    assert rows["promoted"] == ("no: rejected by its gates: locality 0.500 fails min_locality 0.9", None)
    assert all(href is None for _, href in rows.values())
    assert outcome["gates"] == [{"gate": "min_locality", "metric": "locality", "value": 0.5, "threshold": 0.9,
                                 "passed": False}]
    assert gate_results({"max_fluency_drop": 0.5, "min_edit_success": 0.9}, {"final": {}, "fluency_drop": 0.2}) == [
        {"gate": "max_fluency_drop", "metric": "fluency_drop", "value": 0.2, "threshold": 0.5, "passed": True},
        {"gate": "min_edit_success", "metric": "edit_success", "value": None, "threshold": 0.9, "passed": False}]


def test_recent_refreshes_and_cli_compare(refreshes, tmp_path, capsys):
    uri, first, later = refreshes
    client = MlflowClient(uri)
    experiment = client.get_run(first["run_id"]).info.experiment_id
    listed = recent_refreshes(client, experiment, last=5)
    assert [r["run_id"] for r in listed] == [first["run_id"], later]
    assert listed[0]["summary"]["final"]["edit_success"] == first["summary"]["final"]["edit_success"]
    assert [r["summary"]["retention"] for r in listed] == [first["summary"]["retention"], 0.5]
    assert listed[0]["model_version"] == first["version"] and listed[1]["method"] == "kdpo"
    assert [r["run_id"] for r in recent_refreshes(client, experiment, last=1)] == [later]
    from flows.knowledge_refresh import DEFAULT_GATES

    assert [{g["gate"]: g["threshold"] for g in r["gates"]} for r in listed] == [DEFAULT_GATES | RELAXED, DEFAULT_GATES]
    out = tmp_path / "compare"
    assert main(["report", "--compare", "--last", "5", "--tracking-uri", uri, "--out", str(out)]) == 0
    rows = Outline((out / "report.html").read_text()).rows["refreshes"]
    assert [row[0] for row in rows] == [f"v{first['version']}", listed[1]["started"]]  # a version, else its start
    assert rows[1][-2] == (", ".join(g["gate"] for g in listed[1]["gates"] if not g["passed"]) or "all passed")
    with Image.open(out / "gates.png") as image:  # 7 gated metrics: 4 rows of 2 panels
        assert image.size == (round(PANEL_SIZE[0] * 2 * DPI), round(PANEL_SIZE[1] * 4 * DPI))
    with Image.open(out / "trend.png") as image:
        assert image.size == pixels(CURVE_SIZE)
    capsys.readouterr()
    assert main(["report", first["run_id"], "--tracking-uri", uri, "--out", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / "report.html")
    assert main(["report", "--compare", "--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


def red_pixels(path: Path) -> int:
    """Pixels of the gate lines' colour (#cf222e) in a PNG."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 90)).sum())


def test_gate_panels_draw_each_threshold(tmp_path):
    values = [{"gate": "min_locality", "metric": "locality", "value": v, "threshold": t, "passed": v >= t}
              for v, t in ((0.95, 0.9), (0.97, 0.9))]
    with_lines = gates_png(["v1", "v2"], [[row] for row in values], tmp_path / "lines.png", "gates")
    without = gates_png(["v1", "v2"], [[row | {"threshold": float("nan")}] for row in values], tmp_path / "none.png",
                        "gates")
    assert red_pixels(with_lines) > red_pixels(without) + 200  # the legend's sample line is in both


@pytest.mark.skipif(chromium() is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_compare_table_fits_the_page(tmp_path):
    """Twelve refreshes with long names: at 1000 px the page does not scroll sideways (measured by Chromium in a
    copy of the page with a probe script; the report itself has none)."""
    summary = {"edits": 20, "final": {m: 0.9 for m in METRICS}, "fluency_before": 5.0, "retention": 1.0,
               "seconds_per_edit": 3.0, "fluency_drop": 0.1}  # every column measured: the widest table
    refreshes = [{"run_id": f"{i:032x}", "name": f"kdpo-world v{i}: 20 kdpo edits from a-rather-long-file-name-{i}.jsonl",
                  "started": f"2026-01-{i + 1:02d} 00:00:00", "method": "kdpo", "model_version": str(i),
                  "summary": summary, "gates": gate_results({"min_locality": 0.95}, summary)} for i in range(1, 13)]
    text = render_compare(refreshes, tmp_path)
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", "<script>document.title = 'width ' + "
                                             "document.documentElement.scrollWidth;</script></body>"))
    dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,800",
                          "--dump-dom", probe.as_uri()], check=True, capture_output=True, text=True, timeout=120).stdout
    width = int(re.search(r"<title>width (\d+)</title>", dom).group(1))
    assert width <= 1000, f"the page is {width} px wide"
