"""Smoke test of the lifelong-editing benchmark on the tiny world (the real run is `python -m bench.lifelong`)."""
import json

import pytest
from PIL import Image

from bench.lifelong import main


def test_lifelong_benchmark_writes_report_curves_and_bar(tiny_world, tmp_path, monkeypatch):
    out = tmp_path / "lifelong"
    arguments = ["--world", str(tiny_world.path), "--edits", "2,4", "--methods", "ft-m", "--protections",
                 "null-space,none", "--out", str(out), "--quiet", "--set", "max_steps=30", "--jobs", "2"]
    assert main(arguments) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["variants"]) == {"ft-m/null-space", "ft-m/none"}
    last = report["variants"]["ft-m/null-space"]["4"]
    assert 0.0 <= last["edit_success"]["mean"] <= 1.0 and last["locality"]["mean"] is not None
    assert last["multi_token_edit_success"]["mean"] is None or 0 <= last["multi_token_edit_success"]["mean"] <= 1
    assert report["counts"] == [2, 4] and report["seeds"] == [tiny_world.info["config"]["seed"]]
    assert report["bar"] == []  # the bar is checked against KDPO with default settings, not run here
    assert Image.open(out / "curves.png").size[0] > 400
    assert "## Curve" in (out / "report.md").read_text()

    import bench.measure  # the same command again resumes: every finished run is reused, none is redone

    monkeypatch.setattr(bench.measure, "measure_method", lambda job: (_ for _ in ()).throw(AssertionError(job)))
    assert main(arguments) == 0
    assert json.loads((out / "report.json").read_text())["variants"] == report["variants"]


def test_bar_is_checked_on_default_kdpo_at_the_last_count():
    from bench.lifelong import bar_checks, summarize_variant

    summary = {"final": {"edit_success": 0.995, "generalization": 0.5, "locality": 0.98, "fluency": 3.6,
                         "edit_success_exact": 0.9},
               "retention": 0.995, "fluency_before": 3.62, "immediate": {"edit_success": 1.0}, "cpu_seconds_per_edit": 0.2}
    run = {"by_count": [summary], "multi_token": {"edits": 0, "edit_success": None}}
    variants = {"kdpo/memory": summarize_variant([run], (100,)),  # the default; the bar is not checked on the others
                "kdpo/null-space": summarize_variant([{**run, "by_count": [summary | {"retention": 0.0}]}], (100,))}
    checks = bar_checks(variants, (100,))
    met = {check["target"].split()[0]: check["met"] for check in checks}
    assert met == {"edit_success": True, "generalization": False, "locality": True, "retention": True,
                   "edit_success_exact": False, "fluency": True, "cpu_seconds_per_edit": False}
    assert checks[-1]["ratio_to_unprotected_ft_m"] is None  # no unprotected FT-M in this run
    variants["ft-m/none"] = summarize_variant([{**run, "by_count": [summary | {"cpu_seconds_per_edit": 0.08}]}], (100,))
    assert bar_checks(variants, (100,))[-1]["ratio_to_unprotected_ft_m"] == pytest.approx(2.5)


def test_a_negative_checkpoint_interval_is_a_one_line_error(tiny_world, capsys):
    assert main(["--world", str(tiny_world.path), "--edits", "2", "--checkpoint-every", "-1", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == ("bench.lifelong: error: --checkpoint-every expects 0 or a positive "
                                               "number of edits, got -1")
