"""The project's shared benchmark files (../shared/data), present for developers and CI, not in a fresh clone."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """Path of a shared data file; skips the test with a clear reason where it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip("../shared/data not present (fresh clone)")
    return path
