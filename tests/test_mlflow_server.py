"""The refresh flow against a real ``mlflow server`` process on loopback (sqlite backend), and the registered
model behind ``mlflow models serve``."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.knowledge_refresh import knowledge_refresh
from gates import RELAXED
from kdpo.loaders import write_jsonl


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(arguments: list[str], health: str, env: dict | None = None):
    """Start ``mlflow ARGUMENTS --host 127.0.0.1 --port PORT``; its URL once ``health`` answers (bounded wait)."""
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_cli), *arguments, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{url}{health}", timeout=1).status == 200:
                return server, url
        except OSError:
            time.sleep(0.5)
    server.terminate()
    pytest.fail(f"mlflow {arguments[0]} did not come up within 120 s")


@pytest.fixture
def mlflow_server(tmp_path):
    server, url = serve(["server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "1",
                         "--artifacts-destination", str(tmp_path / "server-artifacts")], "/health")
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_refresh_against_a_real_tracking_server(tiny_world, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = knowledge_refresh(model=str(tiny_world.path), limit=2, tracking_uri=mlflow_server, model_name="served",
                               settings={"max_steps": 150}, gates=RELAXED)
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["run_id"])
    assert run.data.tags["kdpo.model_version"] == result["version"]
    assert str(client.get_model_version_by_alias("served", "champion").version) == result["version"]
    # no artifact root given: the server's artifact proxy stores them (--artifacts-destination), not the client
    assert run.info.artifact_uri.startswith("mlflow-artifacts:") and not (tmp_path / "mlartifacts").exists()
    assert list((tmp_path / "server-artifacts").rglob("MLmodel"))


def test_mlflow_models_serve_answers_with_the_edits(tiny_world, tiny_requests, tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlruns.db'}"
    edits = tmp_path / "edits.jsonl"
    write_jsonl(tiny_requests[:2], edits)
    knowledge_refresh(edits_path=str(edits), model=str(tiny_world.path), tracking_uri=tracking, model_name="serving",
                      artifact_root=str(tmp_path / "artifacts"), settings={"max_steps": 150}, gates=RELAXED)
    server, url = serve(["models", "serve", "-m", "models:/serving@champion", "--env-manager", "local"], "/ping",
                        os.environ | {"MLFLOW_TRACKING_URI": tracking,  # serve runs the venv's uvicorn by name
                                      "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        body = {"dataframe_split": {"columns": ["prompt"], "data": [[r.prompt] for r in tiny_requests[:2]]}}
        request = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        answers = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    # each edit was trained until its target leads at every token, so greedy decoding starts with the target
    assert [a.startswith(r.target_new) for a, r in zip(answers, tiny_requests[:2])] == [True, True], answers
