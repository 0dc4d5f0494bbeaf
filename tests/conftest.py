"""A tiny world, built once per test session from a sample of the shipped fact table."""
import os

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # quiet the ephemeral API server's start/stop lines
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # Prefect's 20 s: short on busy CPUs
import pytest

from kdpo.world import WorldConfig, build_world

TINY_WORLD = {
    "max_facts": 150, "hidden_size": 64, "intermediate_size": 256, "layers": 2, "heads": 2,
    "max_epochs": 60, "check_every": 10, "lr": 5e-3, "batch_size": 8, "recall_target": 0.97,
}


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
