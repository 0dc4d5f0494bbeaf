"""Throwaway servers for the deployment tests: a PostgreSQL cluster in a temp folder, an ``mlflow server`` and a
``prefect server start`` on it. Everything binds 127.0.0.1 on a free port, runs in its own process group and is
killed with it; each process logs to a file whose tail a failure shows."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


POSTGRES_TOOLS = ("initdb", "postgres", "pg_isready", "createdb")


def postgres_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: ``$PG_BIN``, ``initdb`` on PATH, or the newest
    ``/usr/lib/postgresql/N/bin`` (Debian's packages keep them off PATH)."""
    def version(path: str) -> int:
        name = Path(path).parent.name
        return int(name) if name.isdigit() else 0

    initdb = shutil.which("initdb")  # resolved: /usr/local/bin/initdb may be a lone link into the real folder
    candidates = [os.environ.get("PG_BIN"), initdb and str(Path(initdb).resolve().parent)]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for candidate in filter(None, candidates):
        if all((Path(candidate) / tool).exists() for tool in POSTGRES_TOOLS):
            return Path(candidate)
    return None


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without MLflow/Prefect/KDPO settings (the tests set their own), one thread per process,
    no Prefect SDK telemetry (DO_NOT_TRACK), the venv's scripts first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "KDPO_"))}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    return env | extra


def tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """``command`` in a new session (its own process group), output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def stop(process: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Signal ``process``'s whole group, wait, then SIGKILL whatever of the group is left."""
    if process is None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)


def wait_for(url: str, process: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    """Until ``url`` answers 200; fails early, with the log's tail, if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail(log)}")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s:\n{tail(log)}")


@dataclass
class Postgres:
    """A PostgreSQL cluster in a fresh temp folder, trust auth for ``postgres`` on 127.0.0.1:``port``.

    initdb refuses to run as root; as root the cluster is made and run as ``nobody`` (``runuser``), in a folder
    under the system temp dir that ``nobody`` owns (pytest's own temp folders are closed to other users)."""
    bin_dir: Path
    port: int = field(default_factory=free_port)
    root: Path | None = None
    process: subprocess.Popen | None = None

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []

    def start(self) -> "Postgres":
        self.root = Path(tempfile.mkdtemp(prefix="kdpo-pg-"))
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        data, log = self.root / "data", self.root / "postgres.log"
        subprocess.run([*self._as_owner(), self.bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust",
                        "-E", "UTF8", "--locale=C", "--no-sync"], check=True, capture_output=True, timeout=120)
        self.process = start([*self._as_owner(), self.bin_dir / "postgres", "-D", data, "-p", str(self.port),
                              "-h", "127.0.0.1", "-k", self.root, "-c", "fsync=off", "-c", "synchronous_commit=off",
                              "-c", "full_page_writes=off"], log, clean_env())
        try:
            deadline = time.monotonic() + 60
            while subprocess.run([self.bin_dir / "pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
                                 capture_output=True).returncode != 0:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start:\n{tail(log)}")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def create_database(self, name: str) -> None:
        subprocess.run([self.bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
                       check=True, capture_output=True, timeout=60)

    def url(self, driver: str, database: str) -> str:
        """``postgresql+DRIVER://postgres@127.0.0.1:PORT/DATABASE`` (SQLAlchemy form: psycopg2, asyncpg)."""
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        stop(self.process, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    artifacts: Path | None = None

    @property
    def api(self) -> str:  # Prefect's PREFECT_API_URL
        return f"{self.url}/api"

    def stop(self) -> None:
        stop(self.process)


def start_mlflow_server(backend_store_uri: str, folder: Path) -> Server:
    """``mlflow server`` on ``backend_store_uri`` (tracking and registry), proxying artifacts to
    ``folder/artifacts`` (``--artifacts-destination``); clients only ever see ``mlflow-artifacts:`` URIs."""
    port, artifacts, log = free_port(), folder / "artifacts", folder / "mlflow-server.log"
    artifacts.mkdir(parents=True, exist_ok=True)
    process = start([VENV_BIN / "mlflow", "server", "--backend-store-uri", backend_store_uri,
                     "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
                     "--workers", "1"], log, clean_env(HOME=str(folder)), cwd=folder)
    server = Server(f"http://127.0.0.1:{port}", process, log, artifacts)
    try:
        wait_for(f"{server.url}/health", process, log, "mlflow server")
    except BaseException:
        server.stop()
        raise
    return server


def start_prefect_server(database_url: str, folder: Path) -> Server:
    """``prefect server start`` with its database at ``database_url`` (``postgresql+asyncpg://``), no UI, no
    telemetry, its PREFECT_HOME in ``folder``."""
    port, log = free_port(), folder / "prefect-server.log"
    env = clean_env(PREFECT_HOME=str(folder / "prefect-home"), PREFECT_API_DATABASE_CONNECTION_URL=database_url,
                    PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false", HOME=str(folder))
    process = start([VENV_BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], log, env,
                    cwd=folder)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for(f"{server.api}/health", process, log, "prefect server", timeout=240)
    except BaseException:
        server.stop()
        raise
    return server
