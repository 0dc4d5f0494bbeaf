"""A tiny world, built once per test session from a sample of the shipped fact table; every test gets its
own ``KDPO_HOME`` and MLflow store, and the session its own Prefect home (Prefect's ephemeral API server and
its database live once per process), so no test reads or writes the user's ``~/.cache/kdpo``, ``~/.prefect``
or a store in the project folder."""
import os
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="kdpo-tests-prefect-")  # before Prefect reads its settings
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # quiet the ephemeral API server's start/stop lines
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # Prefect's 20 s: short on busy CPUs
import mlflow
import pytest

from kdpo.world import WorldConfig, build_world

TINY_WORLD = {
    "max_facts": 150, "hidden_size": 64, "intermediate_size": 256, "layers": 2, "heads": 2,
    "max_epochs": 60, "check_every": 10, "lr": 5e-3, "batch_size": 8, "recall_target": 0.97,
}
# editor settings for a tiny-world edit that must succeed: the budget it needs, and a lead of 1 nat instead of 4
# (the tiny world's final norm bounds how far one token can lead, where depends on the CPU that trained it: 3.8
# nats for one target on some)
TINY_EDIT = {"max_steps": "150", "stop_margin": "1.0"}


@pytest.fixture(autouse=True)
def isolated_stores(tmp_path, monkeypatch):
    """The test's own ``KDPO_HOME`` (worlds, key statistics, refresh work folders) and sqlite MLflow store."""
    monkeypatch.setenv("KDPO_HOME", str(tmp_path / "kdpo-home"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # mlflow.set_experiment exports the id
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # an earlier test's, in another store
    yield
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    return build_world(WorldConfig(**TINY_WORLD), out=tmp_path_factory.mktemp("world") / "tiny", progress=False)


@pytest.fixture(scope="session")
def tiny_requests(tiny_world):
    from kdpo.loaders import load_requests

    return load_requests(tiny_world.edits_path).requests


@pytest.fixture
def tiny_model(tiny_world):
    """A fresh copy of the tiny world's model for each test (edits change it in place)."""
    from kdpo.modeling import load_model

    return load_model(tiny_world.path)
