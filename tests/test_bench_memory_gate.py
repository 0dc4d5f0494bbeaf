"""bench.memory_gate: the forward-pass cost of the edit memory, against the same model without one."""
import json

from bench.memory_gate import main


def test_gate_benchmark_reports_each_slot_count(tiny_world, tmp_path, capsys):
    out = tmp_path / "gate.json"
    assert main(["--model", str(tiny_world.path), "--slots", "0,50", "--repeats", "2", "--batch", "8",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert [row["slots"] for row in report["rows"]] == [0, 50]
    assert all(row["cpu_ms_without"] > 0 and row["cpu_ms_with"] > 0 for row in report["rows"])
    assert report["rows"][1]["bytes_per_slot"] > 0
    assert "| 50 |" in capsys.readouterr().out
