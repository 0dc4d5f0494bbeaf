"""bench.fluency: the fluency change of each chosen edit alone, against the unedited model's."""
import json

from bench.fluency import main
from kdpo.evaluation import probe
from kdpo.loaders import load_requests
from kdpo.metrics import mean
from kdpo.modeling import load_model


def test_fluency_benchmark_scores_each_edit_alone_against_the_unedited_model(tiny_world, tmp_path, capsys):
    out = tmp_path / "fluency.json"
    requests = load_requests(tiny_world.edits_path).requests[:8]
    other = requests[3].target_new if requests[3].target_new != requests[2].target_new else requests[4].target_new
    assert main(["--model", str(tiny_world.path), "--requests", "8", "--edits", "1,2", "--target", f"2={other}",
                 "--set", "max_steps=150", "--set", "stop_margin=1.0", "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    model, tokenizer = load_model(tiny_world.path)
    assert report["fluency_before"] == mean(s.fluency for s in probe(model, tokenizer, requests, 24).scores)
    assert [(r["edit"], r["case_id"], r["target_new"]) for r in report["rows"]] == [
        (1, requests[1].case_id, requests[1].target_new), (2, requests[2].case_id, other)]
    for row in report["rows"]:
        assert row["change"] == row["fluency"] / report["fluency_before"] - 1
    assert requests[1].case_id in capsys.readouterr().out


def test_fluency_benchmark_names_a_bad_index_in_one_line(tiny_world, capsys):
    assert main(["--model", str(tiny_world.path), "--requests", "8", "--edits", "8", "--quiet"]) != 0
    assert main(["--model", str(tiny_world.path), "--requests", "8", "--edits", "first", "--quiet"]) != 0
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("--edits" in line for line in errors)
