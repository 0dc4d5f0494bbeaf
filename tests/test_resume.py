"""Resuming from checkpoints: the library's sequential run, and a refresh interrupted part-way."""
import json
from dataclasses import asdict, fields

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from gates import RELAXED
from kdpo.editing import latest_checkpoint, load_checkpoint, make_config, run_sequential, save_checkpoint
from kdpo.editors.base import Editor
from kdpo.editors.kdpo import KDPOEditor
from kdpo.evaluation import probe
from kdpo.memory import EditMemory
from kdpo.modeling import load_model
from kdpo.protection import ProtectedSubspace



class Interrupted(RuntimeError):
    """The simulated crash."""


def count_edits(monkeypatch, fail_at: int | None = None) -> list[str]:
    """Record the case_id of every KDPO edit made from now on; raise :class:`Interrupted` instead of
    making edit number ``fail_at`` (0-based)."""
    calls: list[str] = []
    original = Editor.edit  # KDPO's edit is the shared loop

    def edit(self, request):
        if len(calls) == fail_at:
            raise Interrupted(f"simulated crash before edit {fail_at}")
        calls.append(request.case_id)
        return original(self, request)

    monkeypatch.setattr(KDPOEditor, "edit", edit)
    return calls


def numbers(value) -> list[float]:
    """Every number in a nested record (dicts, lists, dataclasses), in order."""
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in numbers(value[key])]
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in numbers(item)]
    return [float(value)] if isinstance(value, (int, float)) else []


def test_protected_subspace_state_round_trip(tmp_path):
    keys = torch.randn(50, 8)
    subspace = ProtectedSubspace.from_key_covariance(keys.T @ keys, 1e-2)
    subspace.add_keys(torch.randn(2, 8))
    subspace.add_soft_keys(torch.randn(3, 8))  # the soft memory of committed edits resumes too
    torch.save(subspace.state_dict(), tmp_path / "state.pt")
    restored = ProtectedSubspace.from_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for field in fields(ProtectedSubspace):
        value, expected = getattr(restored, field.name), getattr(subspace, field.name)
        assert (torch.equal(value, expected) if isinstance(expected, torch.Tensor) else value == expected), field.name


def test_resumed_run_matches_an_uninterrupted_one(tiny_world, tiny_requests, tmp_path, monkeypatch):
    requests, corpus, config = tiny_requests[:5], tiny_world.corpus(), make_config("kdpo")
    model, tokenizer = load_model(tiny_world.path)
    baseline = probe(model, tokenizer, requests)
    whole = run_sequential(model, tokenizer, requests, "kdpo", config, corpus, baseline, progress=False)

    first_model, _ = load_model(tiny_world.path)
    saved, done = [], []
    count_edits(monkeypatch, fail_at=3)
    with pytest.raises(Interrupted):
        run_sequential(first_model, tokenizer, requests, "kdpo", config, corpus, baseline, progress=False,
                       on_edit=done.append, checkpoint_every=2,
                       on_checkpoint=lambda state: saved.append(save_checkpoint(tmp_path, first_model, tokenizer, state)))
    assert [p.name for p in saved] == ["checkpoint-000002"] and latest_checkpoint(tmp_path) == saved[0]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-000002"]  # no half-written directory left

    calls = count_edits(monkeypatch)
    resumed_model, resumed_tokenizer, state = load_checkpoint(saved[0])
    assert state.next_edit == 2
    result = run_sequential(resumed_model, resumed_tokenizer, requests, "kdpo", config, corpus, baseline,
                            progress=False, resume=state)
    assert calls == [r.case_id for r in requests[2:]]  # the checkpointed edits are not redone
    assert result.records[:2] == done[:2]  # ... and their records are the original ones, timings included
    assert len(result.records) == len(whole.records) == 5
    for resumed, uninterrupted in zip(result.records, whole.records):
        assert resumed.steps == uninterrupted.steps
        without_time = lambda record: numbers({k: v for k, v in asdict(record).items() if k not in ("seconds", "cpu_seconds")})  # noqa: E731
        assert without_time(resumed) == pytest.approx(without_time(uninterrupted), rel=1e-4, abs=1e-5)
    assert numbers([asdict(s) for s in result.final]) == pytest.approx(numbers([asdict(s) for s in whole.final]), abs=1e-5)
    resumed_memory, memory = EditMemory.of(resumed_model), EditMemory.of(model)  # the default: edits in the memory
    assert [s.facts for s in resumed_memory.slots] == [s.facts for s in memory.slots]
    for resumed, uninterrupted in zip(resumed_memory.A + resumed_memory.B, memory.A + memory.B):
        torch.testing.assert_close(resumed[: len(memory.slots)], uninterrupted[: len(memory.slots)], rtol=1e-4, atol=1e-5)


def test_resume_after_the_last_edit_and_refusals(tiny_world, tiny_requests, monkeypatch):
    model, tokenizer = load_model(tiny_world.path)
    config = make_config("kdpo", overrides={"protection": "none"})
    states = []
    baseline = probe(model, tokenizer, tiny_requests[:2], fluency_tokens=0)
    run_sequential(model, tokenizer, tiny_requests[:2], "kdpo", config, baseline=baseline, progress=False,
                   fluency_tokens=0, checkpoint_every=1, on_checkpoint=states.append)
    assert [s.next_edit for s in states] == [1, 2]
    calls = count_edits(monkeypatch)  # all edits done (a crash in the final evaluation): nothing to redo
    result = run_sequential(model, tokenizer, tiny_requests[:2], "kdpo", config, baseline=baseline, progress=False,
                            fluency_tokens=0, resume=states[1])
    assert calls == [] and result.records == states[1].records and len(result.final) == 2
    with pytest.raises(ValueError, match="baseline"):
        run_sequential(model, tokenizer, tiny_requests[:2], "kdpo", config, progress=False, resume=states[0])
    baseline = probe(model, tokenizer, tiny_requests[2:4], fluency_tokens=0)
    with pytest.raises(ValueError, match="case_id"):
        run_sequential(model, tokenizer, tiny_requests[2:4], "kdpo", config, baseline=baseline, progress=False,
                       resume=states[0])
    with pytest.raises(ValueError, match="checkpoint_every"):
        run_sequential(model, tokenizer, tiny_requests[:1], "kdpo", config, baseline=baseline, progress=False,
                       checkpoint_every=0, on_checkpoint=states.append)


def test_interrupted_refresh_resumes_and_never_moves_the_champion(tiny_world, tmp_path, monkeypatch):
    from flows.knowledge_refresh import knowledge_refresh

    monkeypatch.setenv("KDPO_HOME", str(tmp_path / "home"))
    tracking = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(tracking)
    common = {"model": str(tiny_world.path), "tracking_uri": tracking, "artifact_root": str(tmp_path / "artifacts"),
              "model_name": "resumable", "settings": {"max_steps": 150}, "gates": RELAXED}
    first = knowledge_refresh(limit=1, **common)  # the champion an interrupted refresh must leave alone

    count_edits(monkeypatch, fail_at=3)
    with pytest.raises(Interrupted):
        knowledge_refresh(limit=5, checkpoint_every=2, **common)
    client = MlflowClient(tracking)
    assert [str(v.version) for v in client.search_model_versions("name = 'resumable'")] == [first["version"]]
    for alias in ("champion", "challenger"):
        assert str(client.get_model_version_by_alias("resumable", alias).version) == first["version"]
    (checkpoint,) = (tmp_path / "home" / "refreshes").glob("*/checkpoints/checkpoint-*")
    assert checkpoint.name == "checkpoint-000002"
    done = json.loads((checkpoint / "records.json").read_text())["records"]

    calls = count_edits(monkeypatch)
    second = knowledge_refresh(limit=5, checkpoint_every=2, **common)
    assert len(calls) == 3  # edits 2, 3 and 4: the two checkpointed edits were not redone
    assert second["summary"]["edits"] == 5 and second["promoted"]
    assert str(client.get_model_version_by_alias("resumable", "champion").version) == second["version"]
    children = client.search_runs([client.get_run(second["run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{second['run_id']}'")
    edit_run = next(c for c in children if c.data.tags["kdpo.step"] == "edit")
    assert edit_run.data.params["resumed_at_edit"] == "2"
    result = mlflow.artifacts.load_dict(f"runs:/{edit_run.info.run_id}/edit/result.json")
    assert [r["seconds"] for r in result["records"][:2]] == [r["seconds"] for r in done]
    assert [m.step for m in client.get_metric_history(edit_run.info.run_id, "edit/immediate/edit_success")] == list(range(5))
    checkpoint_files = [a.path for a in client.list_artifacts(edit_run.info.run_id, "edit/checkpoint")]
    assert "edit/checkpoint/records.json" in checkpoint_files
    assert list((tmp_path / "home" / "refreshes").iterdir()) == []  # registered: the work dir is gone
