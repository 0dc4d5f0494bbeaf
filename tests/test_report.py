"""Reports: PNGs of the expected size, a self-contained HTML page that headless Chromium renders (a non-blank
screenshot, the expected headings and rows in its DOM), the CLI, and the refresh flow's report step in MLflow."""
import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image, ImageStat

from kdpo.cli import main
from kdpo.editing import make_config, run_sequential
from kdpo.modeling import load_model
from kdpo.report import CURVE_SIZE, DPI, RADAR_SIZE, ReportInputError, input_kind, render, running_mean
from tasks.dashboards import recent_refreshes, unflatten
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


@pytest.mark.skipif(chromium() is None, reason="no chromium binary (Debian: apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(report, result, tmp_path):
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
    """A refresh of the tiny world in a fresh MLflow store, then a later one that only evaluates (the real
    evaluate task under a new parent run: a second point in time without editing and registering again)."""
    from flows.knowledge_refresh import DEFAULT_GATES, knowledge_refresh
    from tasks.refresh import evaluate_refresh

    folder = tmp_path_factory.mktemp("refreshes")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    first = knowledge_refresh(model=str(tiny_world.path), limit=2, tracking_uri=uri, model_name="reported",
                              artifact_root=str(folder / "artifacts"), settings={"max_steps": 150},
                              gates={"min_locality": 0.0, "max_fluency_drop": 10.0})
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


def test_refresh_markdown_artifact_links_the_report(refreshes):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    _, refresh, _ = refreshes
    with get_client(sync_client=True) as prefect:  # newest first: a long-lived Prefect home holds hundreds of them
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["knowledge-refresh"])),
                                           sort=ArtifactSort.CREATED_DESC, limit=10)
    assert any(f"]({refresh['reports']['report']})" in artifact.data for artifact in artifacts)


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
    out = tmp_path / "compare"
    assert main(["report", "--compare", "--last", "5", "--tracking-uri", uri, "--out", str(out)]) == 0
    assert len(Outline((out / "report.html").read_text()).rows["refreshes"]) == 2
    with Image.open(out / "trend.png") as image:
        assert image.size == pixels(CURVE_SIZE)
    capsys.readouterr()
    assert main(["report", first["run_id"], "--tracking-uri", uri, "--out", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / "report.html")
    assert main(["report", "--compare", "--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err
