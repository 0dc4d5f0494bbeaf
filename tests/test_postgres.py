"""The production recipe of docs/deployment.md, for real: PostgreSQL (a throwaway cluster), ``mlflow server`` on it
with ``--artifacts-destination``, ``prefect server start`` on it; a refresh through them whose champion loads from
a process that cannot see the refreshing client's files; and the project's prefect.yaml deployed with
``prefect deploy``, run by a ``prefect worker`` subprocess."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from gates import RELAXED
from kdpo.loaders import write_jsonl
from servers import (
    ROOT, VENV_BIN, Postgres, clean_env, postgres_bin_dir, start, start_mlflow_server, start_prefect_server, stop, tail,
)

PG_BIN = postgres_bin_dir()
pytestmark = pytest.mark.skipif(
    PG_BIN is None,
    reason="PostgreSQL server binaries (initdb, postgres, pg_isready, createdb) not found: install PostgreSQL "
           "(apt-get install postgresql; .ci/run does) or point PG_BIN at its bin folder",
)


def stopped_after(server, prepare=lambda server: None):
    """Prepare a started server, yield it (a fixture's value), and stop it whatever happens."""
    try:
        prepare(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")  # once per test session (only this module uses them), stopped after it
def postgres():
    yield from stopped_after(Postgres(PG_BIN).start(),
                             lambda cluster: [cluster.create_database(name) for name in ("mlflow", "prefect")])


@pytest.fixture(scope="module")
def mlflow_pg(postgres, tmp_path_factory):
    """``mlflow server --backend-store-uri postgresql+psycopg2://... --artifacts-destination DIR``."""
    yield from stopped_after(start_mlflow_server(postgres.url("psycopg2", "mlflow"), tmp_path_factory.mktemp("mlflow-server")))


@pytest.fixture(scope="module")
def prefect_pg(postgres, tmp_path_factory):
    """``prefect server start`` with ``PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...``."""
    yield from stopped_after(start_prefect_server(postgres.url("asyncpg", "prefect"), tmp_path_factory.mktemp("prefect-server")))


def prefect_settings(server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: server.api})


def test_champion_loads_from_a_process_that_cannot_see_the_client(tiny_world, tiny_requests, mlflow_pg, prefect_pg,
                                                                   tmp_path, monkeypatch):
    from flows.knowledge_refresh import knowledge_refresh

    monkeypatch.setenv("KDPO_HOME", str(tmp_path / "kdpo-home"))
    monkeypatch.chdir(tmp_path)  # a local default (./mlartifacts, mlruns.db) would land here: checked below
    with prefect_settings(prefect_pg):  # the flow run is recorded by the Prefect server on PostgreSQL too
        result = knowledge_refresh(model=str(tiny_world.path), limit=2, tracking_uri=mlflow_pg.url,
                                   model_name="pg-champion", settings={"max_steps": 150}, gates=RELAXED)
    client = MlflowClient(mlflow_pg.url)
    champion = client.get_model_version_by_alias("pg-champion", "champion")
    assert str(champion.version) == result["version"] and result["promoted"]
    # artifacts went through the server's proxy into its --artifacts-destination, nothing into the client's folder
    assert client.get_run(result["run_id"]).info.artifact_uri.startswith("mlflow-artifacts:")
    assert list(mlflow_pg.artifacts.rglob("MLmodel"))
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "mlruns.db").exists()

    # another process: another working directory and HOME, only the tracking URI; the client's folder is gone
    shutil.rmtree(tmp_path / "kdpo-home", ignore_errors=True)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    prompts = [r.prompt for r in tiny_requests[:2]]
    script = ("import json, sys, mlflow, pandas as pd\n"
              "model = mlflow.pyfunc.load_model('models:/pg-champion@champion')\n"
              "answers = model.predict(pd.DataFrame({'prompt': json.loads(sys.argv[1])}))\n"
              "print(json.dumps([str(a) for a in answers]))\n")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(prompts)], cwd=elsewhere, capture_output=True,
                         text=True, timeout=300, env=clean_env(HOME=str(elsewhere), MLFLOW_TRACKING_URI=mlflow_pg.url))
    assert out.returncode == 0, out.stderr[-3000:]
    answers = json.loads(out.stdout.strip().splitlines()[-1])
    assert [a.startswith(r.target_new) for a, r in zip(answers, tiny_requests[:2])] == [True, True], answers


def test_deployed_refresh_runs_on_a_worker(tiny_world, tiny_requests, mlflow_pg, prefect_pg, tmp_path):
    """prefect.yaml as shipped: ``prefect deploy`` fills the job's environment from the deploying shell; the worker
    knows only PREFECT_API_URL and where its checkout is (KDPO_PROJECT_DIR), not the MLflow server."""
    from prefect.client.orchestration import get_client

    prefect_cli = str(VENV_BIN / "prefect")
    kdpo_home = tmp_path / "kdpo-home"
    deployer = clean_env(HOME=str(tmp_path), COLUMNS="200", PREFECT_HOME=str(tmp_path / "deployer-prefect"),
                         PREFECT_API_URL=prefect_pg.api, MLFLOW_TRACKING_URI=mlflow_pg.url, KDPO_HOME=str(kdpo_home))

    def cli(*arguments, cwd=tmp_path, env=deployer, ok=True):
        done = subprocess.run([prefect_cli, *arguments], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
        assert (done.returncode == 0) == ok, f"prefect {' '.join(arguments)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    cli("work-pool", "create", "kdpo", "--type", "process")
    # without the job's MLflow server in the deploying shell, prefect.yaml's build step refuses to deploy
    unset = {k: v for k, v in deployer.items() if k != "MLFLOW_TRACKING_URI"}
    assert "export MLFLOW_TRACKING_URI" in cli("--no-prompt", "deploy", "--all", cwd=ROOT, env=unset, ok=False)
    cli("--no-prompt", "deploy", "--all", cwd=ROOT)  # the project's own prefect.yaml, as docs/deployment.md says

    with prefect_settings(prefect_pg), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("refresh-inbox/knowledge-refresh")
        evaluate = client.read_deployment_by_name("evaluate-champion/evaluate-champion")
    assert evaluate.job_variables["env"]["MLFLOW_TRACKING_URI"] == mlflow_pg.url
    assert deployment.job_variables["env"] == {"MLFLOW_TRACKING_URI": mlflow_pg.url, "KDPO_HOME": str(kdpo_home)}
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
    assert deployment.pull_steps == [  # resolved on the worker, not the deploying machine's $PWD
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $KDPO_PROJECT_DIR }}"}}
    ]

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_jsonl(tiny_requests[:2], inbox / "week-1.jsonl")
    worker_dir, log = tmp_path / "worker", tmp_path / "worker.log"
    worker_dir.mkdir()
    worker = start([prefect_cli, "worker", "start", "--pool", "kdpo", "--type", "process", "--limit", "1"], log,
                   clean_env(HOME=str(worker_dir), PREFECT_HOME=str(worker_dir / "prefect"),
                             PREFECT_API_URL=prefect_pg.api, KDPO_PROJECT_DIR=str(ROOT),
                             PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5"),
                   cwd=worker_dir)
    try:
        parameters = {"inbox": str(inbox), "archive": str(tmp_path / "archive"), "failed": str(tmp_path / "failed"),
                      "model": str(tiny_world.path), "model_name": "deployed", "settings": {"max_steps": 150},
                      "gates": RELAXED}
        out = cli("deployment", "run", "refresh-inbox/knowledge-refresh", "--params", json.dumps(parameters))
        flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
        with prefect_settings(prefect_pg):
            deadline = time.monotonic() + 420
            with get_client(sync_client=True) as client:
                while not (state := client.read_flow_run(flow_run_id).state).is_final():
                    assert worker.poll() is None, f"the worker exited:\n{tail(log)}"
                    assert time.monotonic() < deadline, f"flow run still {state.name}:\n{tail(log)}"
                    time.sleep(2)
        assert state.is_completed(), f"{state.name}: {state.message}\n{tail(log, 80)}"
    finally:
        stop(worker)

    assert [p.name.endswith("week-1.jsonl") for p in (tmp_path / "archive").iterdir()] == [True]
    assert not (tmp_path / "failed").exists() and not list(inbox.iterdir())
    client = MlflowClient(mlflow_pg.url)  # the job's MLFLOW_TRACKING_URI reached the flow run: one registry
    champion = client.get_model_version_by_alias("deployed", "champion")
    run = client.get_run(champion.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert (kdpo_home / "refreshes").is_dir()  # and its KDPO_HOME
