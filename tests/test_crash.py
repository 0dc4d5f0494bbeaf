"""Crash and concurrency safety with real processes: SIGKILL after a checkpoint and during one, the refresh
lock against a second process, and one-line refusals of bad arguments by ``python -m flows.knowledge_refresh``."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from gates import RELAXED
from kdpo.editing import latest_checkpoint, load_checkpoint, make_config, run_sequential
from kdpo.evaluation import probe
from kdpo.loaders import load_requests
from kdpo.modeling import load_model
from tasks.caching import RefreshLocked, refresh_work_dir

ROOT = Path(__file__).resolve().parents[1]


def isolated_env(home: Path) -> dict[str, str]:
    """A subprocess environment with its own KDPO_HOME and PREFECT_HOME, one thread (identical arithmetic)."""
    return os.environ | {"KDPO_HOME": str(home / "kdpo"), "PREFECT_HOME": str(home / "prefect"),
                         "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}


def start_refresh(world: Path, home: Path) -> subprocess.Popen:
    """``python -m flows.knowledge_refresh`` on the tiny world, 4 edits, a checkpoint every 2, in ``home``."""
    home.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "flows.knowledge_refresh", "--model", str(world), "--limit", "4",
               "--checkpoint-every", "2", "--set", "max_steps=60", "--model-name", "crash",
               "--tracking-uri", f"sqlite:///{home / 'mlruns.db'}", "--artifact-root", str(home / "artifacts")]
    return subprocess.Popen(command, cwd=ROOT, env=isolated_env(home), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> None:
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]


def refresh_runs(home: Path) -> tuple[MlflowClient, list]:
    """The MLflow client of ``home``'s store and all runs of its refresh experiment."""
    client = MlflowClient(f"sqlite:///{home / 'mlruns.db'}")
    return client, client.search_runs([client.get_experiment_by_name("knowledge-refresh").experiment_id])


def step(runs: list, name: str) -> list:
    return [run for run in runs if run.data.tags.get("kdpo.step") == name and run.info.status == "FINISHED"]


def weight_digests(client: MlflowClient, out: Path) -> dict[str, str]:
    """SHA-256 of the registered version's weights and edit memory."""
    (version,) = client.search_model_versions("name = 'crash'")
    root = Path(mlflow.artifacts.download_artifacts(
        client.get_model_version_download_uri("crash", version.version), dst_path=str(out)))
    model_dir = next(root.rglob("model.safetensors")).parent
    return {name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
            for name in ("model.safetensors", "edit_memory.safetensors")}


def test_sigkill_after_a_checkpoint_resumes_to_the_identical_model(tiny_world, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted, victim = start_refresh(tiny_world.path, whole), start_refresh(tiny_world.path, killed)
    deadline = time.monotonic() + 600
    while not list((killed / "kdpo" / "refreshes").glob("*/checkpoints/checkpoint-*")):
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[0][-3000:]
        time.sleep(0.1)
    os.killpg(victim.pid, signal.SIGKILL)  # the refresh and its ephemeral Prefect server
    victim.wait()
    finish(start_refresh(tiny_world.path, killed))
    finish(uninterrupted)

    client, runs = refresh_runs(killed)
    assert [run for run in runs if run.info.status == "RUNNING"] == []
    assert {"KILLED", "FINISHED"} <= {run.info.status for run in runs}
    assert [run.data.params["resumed_at_edit"] for run in step(runs, "edit")] == ["2"]
    whole_client, whole_runs = refresh_runs(whole)
    final = lambda runs: {k: v for k, v in step(runs, "evaluate")[0].data.metrics.items() if "second" not in k}  # noqa: E731
    assert final(runs) == final(whole_runs) and "eval/final/edit_success" in final(runs)
    assert weight_digests(client, tmp_path / "a") == weight_digests(whole_client, tmp_path / "b")
    assert list((killed / "kdpo" / "refreshes").iterdir()) == []


SAVE_THEN_HANG = """
import sys, time
from pathlib import Path
import torch
from kdpo.editing import make_config, run_sequential, save_checkpoint
from kdpo.loaders import load_requests
from kdpo.modeling import load_model

world, root = sys.argv[1], Path(sys.argv[2])
model, tokenizer = load_model(world)
save = torch.save

def hang_in_second_save(obj, path, *args, **kwargs):  # the weights are written; the editor state is next
    if (root / "checkpoint-000002").exists():
        print("saving", flush=True)
        time.sleep(600)
    save(obj, path, *args, **kwargs)

torch.save = hang_in_second_save
run_sequential(model, tokenizer, load_requests(f"{world}/edits.jsonl").requests[:3], "kdpo",
               make_config("kdpo", overrides={"max_steps": 60}), progress=False, fluency_tokens=0, checkpoint_every=2,
               on_checkpoint=lambda state: save_checkpoint(root, model, tokenizer, state))
"""


def test_kill_during_save_checkpoint_leaves_the_previous_one(tiny_world, tmp_path):
    root = tmp_path / "checkpoints"
    saver = subprocess.Popen([sys.executable, "-c", SAVE_THEN_HANG, str(tiny_world.path), str(root)], cwd=ROOT,
                             env=isolated_env(tmp_path), stdout=subprocess.PIPE, text=True)
    assert saver.stdout.readline().strip() == "saving"
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    (staging,) = root.glob(".writing-*")
    assert (staging / "model.safetensors").exists() and not (staging / "editor_state.pt").exists()

    assert latest_checkpoint(root) == root / "checkpoint-000002"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-000002"]  # the half-written folder is gone
    model, tokenizer, state = load_checkpoint(root / "checkpoint-000002")
    requests = load_requests(tiny_world.edits_path).requests[:3]
    baseline = probe(*load_model(tiny_world.path), requests, fluency_tokens=0)
    result = run_sequential(model, tokenizer, requests, "kdpo", make_config("kdpo", overrides={"max_steps": 60}),
                            baseline=baseline, progress=False, fluency_tokens=0, resume=state)
    assert [r.case_id for r in result.records] == [r.case_id for r in requests] and len(result.final) == 3


HOLD_LOCK = """
import sys, time
from tasks.caching import refresh_lock
with refresh_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_identical_refresh_is_refused_and_a_dead_holder_is_taken_over(tiny_world, tmp_path, monkeypatch):
    from flows.knowledge_refresh import knowledge_refresh

    monkeypatch.setenv("KDPO_HOME", str(tmp_path / "kdpo"))
    tracking = f"sqlite:///{tmp_path / 'mlruns.db'}"
    arguments = {"model": str(tiny_world.path), "limit": 1, "settings": {"max_steps": 150}, "gates": RELAXED,
                 "tracking_uri": tracking, "artifact_root": str(tmp_path / "artifacts"), "model_name": "locked"}
    work_dir = refresh_work_dir(str(tiny_world.path / "edits.jsonl"), str(tiny_world.path), "kdpo",
                                arguments["settings"], 1, False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(work_dir)], cwd=ROOT, env=isolated_env(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RefreshLocked, match=f"{work_dir / 'lock'} is held by pid {holder.pid}$"):
            knowledge_refresh(**arguments)
        assert MlflowClient(tracking).search_runs([MlflowClient(tracking).get_experiment_by_name(
            "knowledge-refresh").experiment_id]) == []  # refused before any run
    finally:
        holder.kill()
        holder.wait()
    assert (work_dir / "lock").read_text() == str(holder.pid)  # a dead holder's lock file: taken over
    assert knowledge_refresh(**arguments)["promoted"]


@pytest.mark.parametrize("arguments, message", [
    (["--limit", "0"], "limit must be at least 1, got 0"),
    (["--limit", "-5"], "limit must be at least 1, got -5"),
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--set", "max_steps=many"], "setting 'max_steps' expects int"),
    (["--gate", "min_localty=0.9"], "min_localty: unknown gate; gates: min_edit_success,"),
    (["--tracking-uri", "sqlite:////proc/kdpo/mlruns.db"], "MLflow tracking URI sqlite:////proc/kdpo/mlruns.db is not usable"),
])
def test_bad_arguments_are_refused_in_one_line_before_any_work(tiny_world, tmp_path, arguments, message):
    command = [sys.executable, "-m", "flows.knowledge_refresh", "--model", str(tiny_world.path),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}", *arguments]
    done = subprocess.run(command, cwd=ROOT, env=isolated_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: {message}") and done.stderr.count("\n") == 1, done.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("kdpo", "mlruns.db")]  # no work, no store
