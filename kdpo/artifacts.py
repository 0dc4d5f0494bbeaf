"""Where a new MLflow experiment keeps its artifacts: the one rule the refresh flow and the benchmark share."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

# tracking servers that own their artifact store (``mlflow server --artifacts-destination``, Databricks)
SERVER_SCHEMES = ("http", "https", "databricks")


def is_uri(location: str) -> bool:
    """True for ``s3://b/k``, ``mlflow-artifacts:/x``, ``file:///x``, ``gs://...``; False for plain paths
    (``mlartifacts``, ``/data/a``, ``C:\\data`` -- a one-letter scheme is a Windows drive, not a URI)."""
    return len(urlparse(location).scheme) > 1


def experiment_artifact_location(tracking_uri: str, artifact_root: str | None = None) -> str | None:
    """The ``artifact_location`` to create an experiment with (``None``: let the tracking server decide).

    * ``artifact_root`` a URI (``s3://``, ``mlflow-artifacts:``, ``file:``, ...): passed through unchanged.
    * ``artifact_root`` a plain local path: its absolute ``file://`` URI.
    * no ``artifact_root`` and an http(s) tracking server: ``None``, so the server's artifact proxy
      (``--artifacts-destination``) stores them and every client, on any machine, reads them back through it.
    * no ``artifact_root`` and a local store (sqlite, a folder): ``./mlartifacts`` as a ``file://`` URI.
    """
    if artifact_root:
        return artifact_root if is_uri(artifact_root) else Path(artifact_root).expanduser().resolve().as_uri()
    if tracking_uri == "databricks" or urlparse(tracking_uri or "").scheme in SERVER_SCHEMES:
        return None
    return Path("mlartifacts").resolve().as_uri()
