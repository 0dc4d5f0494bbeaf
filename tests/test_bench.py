"""Smoke test of the benchmark harness (bench/compare.py): the tiny world, 5 sequential edits, 2 methods,
each a Prefect task on a Dask worker process; the report files and the MLflow runs must exist and hold the
measured numbers."""
import json
from dataclasses import replace

import distributed
import mlflow
import pytest

from bench.compare import eval_curve, main
import bench.measure
from bench.measure import Job, measure_method, proc_status_bytes, run_jobs
from kdpo.editing import make_config, run_sequential
from kdpo.loaders import load_requests

METHODS = ("kdpo", "ft-m")


@pytest.fixture(scope="module")
def bench_run(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    argv = ["--world", str(tiny_world.path), "--edits", "3,5", "--methods", ",".join(METHODS), "--out", str(root / "out"),
            "--tracking-uri", uri, "--artifact-root", str(root / "artifacts"), "--quiet"]
    assert main(argv) == 0
    return json.loads((root / "out" / "report.json").read_text()), root / "out", uri


def test_report_holds_every_method_at_every_edit_count(bench_run):
    report, out, _ = bench_run
    assert [row["method"] for row in report["rows"]] == list(METHODS) and report["counts"] == [3, 5]
    for row in report["rows"]:
        assert [s["edits"] for s in row["by_count"]] == [3, 5]
        for summary in row["by_count"]:
            assert 0.0 <= summary["final"]["edit_success"] <= 1.0 and summary["immediate"]["edit_success"] > 0.5
            assert summary["seconds_per_edit"] > 0 and summary["final_eval_seconds"] > 0
        memory = row["memory"]
        peaks = [memory[f"peak_{phase}_mb"] for phase in ("load_and_probe", "setup", "edits", "rest")]
        assert memory["peak_rss_mb"] == max(peaks) and min(peaks) >= memory["rss_before_load_mb"] > 0
        assert memory["edits_over_start_mb"] >= 0 and memory["setup_over_start_mb"] >= 0
        assert memory["ratio"] == pytest.approx(memory["peak_over_baseline_mb"] / memory["budget_mb"])
        assert len(json.loads((out / f"{row['method']}.json").read_text())["records"]) == 5
    per_edit = {row["method"]: row["by_count"][-1]["seconds_per_edit"] for row in report["rows"]}
    assert report["speed"]["kdpo_over_ft_m"] == pytest.approx(per_edit["kdpo"] / per_edit["ft-m"])
    assert report["schedule"].startswith("immediate:") and "locality" in report["protocol"]
    text = (out / "report.md").read_text()
    assert all(heading in text for heading in ("## Quality", "## Speed", "## Memory", "## Targets"))
    assert text.count("\nkdpo ") >= 2 + 1 + 1  # two quality rows, one speed row, one memory row


def test_one_mlflow_run_per_method_with_metrics_by_edit_count_and_the_report(bench_run):
    report, _, uri = bench_run
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("kdpo-benchmark")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {*METHODS, "benchmark tiny"}
    parent = runs["benchmark tiny"].info.run_id
    for row in report["rows"]:
        run = runs[row["method"]]
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.params["method"] == row["method"]
        history = client.get_metric_history(run.info.run_id, "final/edit_success")
        assert [(m.step, m.value) for m in history] == [(s["edits"], s["final"]["edit_success"]) for s in row["by_count"]]
        assert run.data.metrics["memory/ratio"] == pytest.approx(row["memory"]["ratio"])
        assert {"report.md", "report.json", f"{row['method']}.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_the_3_edit_figures_equal_a_separate_3_edit_run(bench_run, tiny_world, tiny_model):
    report, _, _ = bench_run
    model, tokenizer = tiny_model
    requests = load_requests(tiny_world.edits_path, limit=3).requests
    alone = run_sequential(model, tokenizer, requests, "ft-m", make_config("ft-m"), tiny_world.corpus(), progress=False)
    expected = alone.summary()
    measured = next(row for row in report["rows"] if row["method"] == "ft-m")["by_count"][0]
    for name in ("edit_success", "generalization", "locality"):
        assert measured["final"][name] == pytest.approx(expected["final"][name]), name
    assert measured["retention"] == pytest.approx(expected["retention"])


def test_user_mistakes_are_one_line_errors(tiny_world, capsys):
    world = ["--world", str(tiny_world.path), "--no-mlflow"]
    assert main([*world, "--edits", "0"]) == 2
    assert main([*world, "--edits", "5", "--methods", "kdpo,rome"]) == 2
    assert main([*world, "--edits", "100000"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(line.startswith("bench.compare: error:") for line in errors)
    assert "--edits" in errors[0] and "'rome'" in errors[1] and "100000" in errors[2]


def test_eval_curve_fits_seconds_per_request_and_memory_fields_are_read():
    row = {"by_count": [{"edits": n, "final_eval_seconds": 0.5 + 0.01 * n} for n in (25, 50, 100, 200)]}
    curve = eval_curve(row)
    assert curve["slope_seconds_per_request"] == pytest.approx(0.01) and curve["intercept_seconds"] == pytest.approx(0.5)
    assert proc_status_bytes("VmRSS") > 0
    with pytest.raises(ValueError, match="VmNope"):
        proc_status_bytes("VmNope")


def test_jobs_fan_out_on_dask_resume_by_identity_and_run_on_a_given_scheduler(tiny_world, tmp_path):
    out = tmp_path / "local"
    out.mkdir()
    jobs = [Job(str(tiny_world.path), method, (1, 2), out=str(out), threads=1) for method in METHODS]
    results = run_jobs(jobs, parallel=2)  # a local cluster of 2 single-threaded worker processes
    assert [r["method"] for r in results] == list(METHODS)
    assert all([s["edits"] for s in r["by_count"]] == [1, 2] and r["torch_threads"] == 1 for r in results)
    assert all(r["memory"]["peak_over_baseline_mb"] > 0 for r in results)
    summaries = [out / f"{method}.summary.json" for method in METHODS]
    written = [path.stat().st_mtime_ns for path in summaries]
    assert run_jobs(jobs, parallel=2) == json.loads(json.dumps(results))  # resumed: every job's summary reused
    assert [path.stat().st_mtime_ns for path in summaries] == written

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        argv = ["--world", str(tiny_world.path), "--edits", "2", "--methods", "ft-m", "--out", str(tmp_path / "remote"),
                "--no-mlflow", "--quiet", "--dask-address", cluster.scheduler_address]
        assert main(argv) == 0
        assert "measure_task" in cluster.scheduler.task_prefixes  # the job ran on this cluster's worker
    report = json.loads((tmp_path / "remote" / "report.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["ft-m"] and report["rows"][0]["by_count"][0]["edits"] == 2


class Interrupted(Exception):
    pass


def test_an_interrupted_long_run_resumes_from_its_checkpoint(tiny_world, tmp_path, monkeypatch):
    whole = measure_method(Job(str(tiny_world.path), "kdpo", (2, 4), out=str(tmp_path)))
    job = Job(str(tiny_world.path), "kdpo", (2, 4), out=str(tmp_path), checkpoint_every=2)
    run_sequential_of = bench.measure.run_sequential

    def stop_at_third_edit(*args, on_edit, **kwargs):
        def edited(record):
            on_edit(record)
            if record.index == 2:
                raise Interrupted
        return run_sequential_of(*args, on_edit=edited, **kwargs)

    monkeypatch.setattr(bench.measure, "run_sequential", stop_at_third_edit)
    with pytest.raises(Interrupted):
        measure_method(job)
    run_dir = tmp_path / "kdpo.run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["baseline.json", "checkpoint-000002", "job.json",
                                                          "measured-000002.json"]
    monkeypatch.setattr(bench.measure, "run_sequential", run_sequential_of)
    resumed = measure_method(job)
    assert resumed["resumed_at"] == 2 and whole["resumed_at"] is None
    for part, uninterrupted in zip(resumed["by_count"], whole["by_count"]):
        assert part["edits"] == uninterrupted["edits"]
        assert part["final"] == pytest.approx(uninterrupted["final"], abs=1e-6)
        assert part["steps_per_edit"] == uninterrupted["steps_per_edit"]
    # another job (other counts) does not take this run's checkpoint: it starts afresh
    assert measure_method(replace(job, counts=(1,)))["resumed_at"] is None
