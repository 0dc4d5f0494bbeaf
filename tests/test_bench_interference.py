"""bench.interference: what edit-memory slots do to the answers their gates open on that are not their edits."""
import json

from bench.interference import main
from kdpo.loaders import load_requests


def test_interference_benchmark_runs_each_value_and_leaves_ungated_prompts_alone(tiny_world, tmp_path, capsys):
    out = tmp_path / "interference.json"
    requests = load_requests(tiny_world.edits_path).requests[:12]
    subjects = len({r.subject for r in requests})  # all of them: their other facts among the locality prompts
    assert main(["--model", str(tiny_world.path), "--requests", "12", "--subjects", str(subjects), "--set", "max_steps=150",
                 "--vary", "memory.preserve_weight=0,16", "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert [row["settings"] for row in report["rows"]] == [{"max_steps": "150", "memory.preserve_weight": v}
                                                          for v in ("0", "16")]
    for row in report["rows"]:
        assert row["edits"] == 12 and 0 <= row["edit_success"] <= 1
        assert 0 < row["gated_prompts"] < sum(len(r.locality) for r in requests)
        assert row["locality_ungated"] == 1.0  # where no gate opens the model is exactly the base model
    assert "memory.preserve_weight=16" in capsys.readouterr().out
