"""Where a new experiment keeps its artifacts: the tracking server decides, URIs pass through, paths become file URIs."""
from pathlib import Path

import pytest

from kdpo.artifacts import experiment_artifact_location, is_uri


@pytest.mark.parametrize("tracking", ["http://mlflow:5000", "https://mlflow.example.org", "databricks",
                                      "databricks://profile"])
def test_a_tracking_server_decides_where_artifacts_go(tracking):
    assert experiment_artifact_location(tracking) is None


@pytest.mark.parametrize("root", ["s3://bucket/kdpo", "mlflow-artifacts:/kdpo", "mlflow-artifacts://host:5000/kdpo",
                                  "gs://bucket/kdpo", "file:///data/mlartifacts", "wasbs://c@acct.blob.core.windows.net/x",
                                  "hdfs://namenode/kdpo"])
@pytest.mark.parametrize("tracking", ["http://mlflow:5000", "sqlite:///mlruns.db"])
def test_an_artifact_root_uri_passes_through_unchanged(root, tracking):
    assert experiment_artifact_location(tracking, root) == root


def test_a_local_artifact_root_becomes_a_file_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert experiment_artifact_location("sqlite:///mlruns.db", "arts") == (tmp_path / "arts").as_uri()
    assert experiment_artifact_location("http://mlflow:5000", str(tmp_path / "a b")) == (tmp_path / "a b").as_uri()
    assert experiment_artifact_location("sqlite:///mlruns.db") == (tmp_path / "mlartifacts").as_uri()
    assert experiment_artifact_location("", None) == (tmp_path / "mlartifacts").as_uri()
    assert experiment_artifact_location(str(tmp_path / "mlruns")) == (tmp_path / "mlartifacts").as_uri()


def test_what_counts_as_a_uri():
    assert is_uri("s3://b/k") and is_uri("mlflow-artifacts:/x") and is_uri("file:///x")
    assert not any(is_uri(p) for p in ("mlartifacts", "/data/arts", "./arts", "C:\\data\\arts", str(Path.home())))
