"""Registration: one version per refresh however often it is retried, no promotion over a champion that moved,
a failure after registration (the inbox archives the file, a re-run finds the version), and the pyfunc's
signature, parameters, requirements and answers."""
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from gates import RELAXED
from kdpo.evaluation import first_sentence, greedy_generate
from kdpo.loaders import write_jsonl
from kdpo.modeling import load_model
from tasks.pyfunc import log_pyfunc
from tasks.refresh import NO_CHAMPION, register_model

PASSED = {"passed": True, "rejected": ""}


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPO_HOME", str(tmp_path / "kdpo"))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registration")  # not an experiment id an earlier test's store had
    return uri


def register(world, key: str, started_from: str | None, decision: dict = PASSED) -> dict:
    """The register task for a refresh ``key`` (the tiny world standing in for its edited model)."""
    with mlflow.start_run() as parent:
        pass
    return register_model(str(world.path), parent.info.run_id, "shared", decision, f"refresh {key}", key, started_from)


def test_registration_is_idempotent_and_never_promotes_over_a_moved_champion(tiny_world, tracking):
    client = MlflowClient(tracking)
    alias = lambda name: str(client.get_model_version_by_alias("shared", name).version)  # noqa: E731
    assert register(tiny_world, "first", NO_CHAMPION)["promoted"] and alias("champion") == "1"
    # refreshes A and B both start from champion 1; B registers first and is promoted
    assert register(tiny_world, "b", "1") == {"version": "2", "promoted": True, "previous_champion": "1",
                                              "not_promoted": ""}
    a = register(tiny_world, "a", "1")
    assert a["version"] == "3" and not a["promoted"] and "started from: 1, champion now: 2" in a["not_promoted"]
    assert (alias("champion"), alias("challenger"), alias("previous-champion")) == ("2", "3", "1")
    assert client.get_model_version("shared", "3").tags["not_promoted"] == a["not_promoted"]
    # retried registrations find their versions: none is created, no alias points back at itself
    assert register(tiny_world, "b", "1") == {"version": "2", "promoted": True, "previous_champion": "1",
                                              "not_promoted": ""}
    assert register(tiny_world, "a", "1")["version"] == "3"
    assert (alias("champion"), alias("previous-champion")) == ("2", "1")
    assert sorted(v.version for v in client.search_model_versions("name = 'shared'")) == [1, 2, 3]
    # a refresh that started from the world (no champion then) does not replace one registered meanwhile
    assert not register(tiny_world, "late-first", NO_CHAMPION)["promoted"] and alias("champion") == "2"
    rejected = register(tiny_world, "bad", "2", {"passed": False, "rejected": "locality 0.500 fails min_locality 0.9"})
    assert not rejected["promoted"] and alias("champion") == "2"
    assert client.get_model_version("shared", rejected["version"]).tags["rejected"] == "locality 0.500 fails min_locality 0.9"


def test_a_failure_after_registration_archives_the_file_and_a_rerun_finds_the_version(
    tiny_world, tiny_requests, tracking, tmp_path, monkeypatch,
):
    import flows.knowledge_refresh
    from flows.inbox import InboxFailed, refresh_inbox

    def report_fails(*args, **kwargs):
        raise OSError("the report's disk is full")

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_jsonl(tiny_requests[:2], inbox / "edits.jsonl")
    common = {"model": str(tiny_world.path), "tracking_uri": tracking, "artifact_root": str(tmp_path / "artifacts"),
              "model_name": "late", "settings": {"max_steps": 150}, "gates": RELAXED}
    monkeypatch.setattr(flows.knowledge_refresh, "report_refresh", report_fails)
    with pytest.raises(InboxFailed, match="edits.jsonl: the report's disk is full") as failure:
        refresh_inbox(inbox=str(inbox), archive=str(tmp_path / "archive"), failed=str(tmp_path / "failed"), **common)
    (archived,) = failure.value.outcome["archived"]  # registered: archived, with the error beside it
    assert failure.value.outcome["failed"] == [] and "OSError" in Path(archived + ".error.txt").read_text()
    client = MlflowClient(tracking)
    (version,) = client.search_model_versions("name = 'late'")
    (work_dir,) = (tmp_path / "kdpo" / "refreshes").iterdir()  # kept: the work folder goes last
    assert version.tags["kdpo.refresh_key"] == work_dir.name
    (parent,) = client.search_runs([client.get_experiment_by_name("knowledge-refresh").experiment_id],
                                   f"tags.`kdpo.refresh_key` = '{work_dir.name}'")
    assert (parent.info.status, parent.data.tags["kdpo.model_version"]) == ("FAILED", "1")

    monkeypatch.undo()
    monkeypatch.setenv("KDPO_HOME", str(tmp_path / "kdpo"))
    again = flows.knowledge_refresh.knowledge_refresh(edits_path=archived, **common)
    assert again["version"] == "1" and again["promoted"]
    assert [str(v.version) for v in client.search_model_versions("name = 'late'")] == ["1"]
    assert not work_dir.exists()


def test_pyfunc_has_a_signature_honours_max_new_tokens_and_ends_at_the_answer(tiny_world, tiny_requests, tracking):
    with mlflow.start_run():
        info = log_pyfunc(str(tiny_world.path))
    assert info.signature.params.to_dict()[0]["name"] == "max_new_tokens"
    root = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    requirements = (root / "requirements.txt").read_text()
    assert all(f"\n{package}==" in f"\n{requirements}" for package in ("mlflow", "torch", "transformers"))
    assert "kdpo-refresh" not in requirements
    assert yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]["code"] == "code"
    assert {"kdpo", "tasks"} <= {p.name for p in (root / "code").iterdir()}

    served = mlflow.pyfunc.load_model(info.model_uri)
    model, tokenizer = load_model(tiny_world.path)
    prompts = [r.prompt for r in tiny_requests[:8]]
    raw = greedy_generate(model, tokenizer, prompts, 16)
    answers = served.predict(prompts, params={"max_new_tokens": 16})
    assert answers == [first_sentence(text) for text in raw]
    assert any(len(text) > len(answer) for text, answer in zip(raw, answers))  # cut at the answer's end
    assert sum(a == r.ground_truth for a, r in zip(answers, tiny_requests)) >= 6  # the world's facts
    one = served.predict(prompts, params={"max_new_tokens": 1})
    assert one == [first_sentence(text) for text in greedy_generate(model, tokenizer, prompts, 1)] != answers
