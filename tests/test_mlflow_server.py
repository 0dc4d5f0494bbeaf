"""The refresh flow against a real ``mlflow server`` process on loopback (sqlite backend)."""
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.knowledge_refresh import knowledge_refresh


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # bounded wait for the server to come up
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up within 60 s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_refresh_against_a_real_tracking_server(tiny_world, mlflow_server, tmp_path):
    result = knowledge_refresh(model=str(tiny_world.path), limit=2, tracking_uri=mlflow_server, model_name="served",
                               artifact_root=str(tmp_path / "artifacts"), settings={"max_steps": 150},
                               gates={"min_locality": 0.0, "max_fluency_drop": 10.0})
    client = MlflowClient(mlflow_server)
    assert client.get_run(result["run_id"]).data.tags["kdpo.model_version"] == result["version"]
    assert str(client.get_model_version_by_alias("served", "champion").version) == result["version"]
