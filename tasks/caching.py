"""Content keys of a refresh's inputs: the Prefect cache key of the baseline probe, and the refresh's work
directory (its checkpoints, under a lock), so re-running the same refresh finds them."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from kdpo.requests import EditRequest
from kdpo.world import cache_root


def _update_with_file(digest, path: Path) -> None:
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def directory_digest(path: str | Path) -> str:
    """SHA-256 of every file under ``path``, names and contents (a model directory: weights and all); read once
    per process while no file's size or modification time changes, so a refresh hashes its model once."""
    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return _digest_of_files(root, tuple((f, f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.cache
def _digest_of_files(root: Path, files: tuple[tuple[Path, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for file, _, _ in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        _update_with_file(digest, file)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of one file's content."""
    digest = hashlib.sha256()
    _update_with_file(digest, Path(path))
    return digest.hexdigest()


def requests_digest(requests: list[EditRequest]) -> str:
    """SHA-256 of the requests' canonical JSON."""
    return hashlib.sha256(json.dumps([r.to_dict() for r in requests], sort_keys=True).encode()).hexdigest()


def probe_cache_key(context, parameters: dict) -> str:
    """Prefect cache key of the baseline probe: the model's files and the requests probed."""
    return f"probe-{directory_digest(parameters['model_dir'])[:16]}-{requests_digest(parameters['requests'])[:16]}"


def refresh_work_dir(
    edits_path: str, model_dir: str, method: str, settings: dict | None, limit: int | None, quarantine: bool,
    revert: list[str] | None = None,
) -> Path:
    """``$KDPO_HOME/refreshes/KEY``, created: the work directory of the refresh with these inputs (edit file
    content, starting model files, method, settings, limit, quarantine, edits reverted first), so a re-run after
    a crash resumes."""
    inputs = {"edits": file_digest(edits_path), "model": directory_digest(model_dir), "method": method,
              "settings": settings or {}, "limit": limit, "quarantine": quarantine,
              "revert": sorted(revert or [])}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_root().parent / "refreshes" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


class RefreshLocked(RuntimeError):
    """Another process is running the same refresh (it holds the work directory's lock)."""


@contextmanager
def refresh_lock(work_dir: str | Path):
    """Hold ``work_dir/lock`` (``fcntl.flock``, with the holder's pid in it) while the refresh runs; refuse at
    once if a live process holds it. The kernel drops a dead holder's lock, so a stale file is taken over."""
    path = Path(work_dir) / "lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise RefreshLocked(f"the same refresh is running already: {path} is held by pid "
                                f"{handle.read().strip() or '?'}") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
