"""Smoke test of the lifelong-editing benchmark on the tiny world (the real run is `python -m bench.lifelong`)."""
import json

from PIL import Image

from bench.lifelong import main


def test_lifelong_benchmark_writes_report_curves_and_bar(tiny_world, tmp_path):
    out = tmp_path / "lifelong"
    code = main(["--world", str(tiny_world.path), "--edits", "2,4", "--methods", "ft-m",
                 "--protections", "null-space,none", "--out", str(out), "--quiet", "--set", "max_steps=30"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["variants"]) == {"ft-m/null-space", "ft-m/none"}
    last = report["variants"]["ft-m/null-space"]["4"]
    assert 0.0 <= last["edit_success"]["mean"] <= 1.0 and last["locality"]["mean"] is not None
    assert last["multi_token_edit_success"]["mean"] is None or 0 <= last["multi_token_edit_success"]["mean"] <= 1
    assert report["counts"] == [2, 4] and report["seeds"] == [tiny_world.info["config"]["seed"]]
    assert report["bar"] == []  # the bar is checked against protected KDPO, not run here
    assert Image.open(out / "curves.png").size[0] > 400
    assert "## Curve" in (out / "report.md").read_text()
