"""The real server for the client's tests: built by cargo once per session, started on a free
port over a fresh database of either backend (SQLite in a temp dir, or a PostgreSQL database of
its own, dropped afterwards), and stopped by its pid.

PostgreSQL is at ``HOPPER_TEST_POSTGRES_URL`` (``postgres://root@127.0.0.1:5432/test``); its
tests are skipped when it is down, except under ``CI=true`` or ``HOPPER_REQUIRE_POSTGRES=1``,
where that is a failure. ``HOPPER_SERVER_BIN`` names a built server to use instead of cargo's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import pytest

REPO = Path(__file__).resolve().parents[3]
ADMIN_URL = os.environ.get("HOPPER_TEST_POSTGRES_URL", "postgres://root@127.0.0.1:5432/test")
POSTGRES_REQUIRED = (
    os.environ.get("CI") == "true" or os.environ.get("HOPPER_REQUIRE_POSTGRES") == "1"
)


@pytest.fixture(scope="session")
def server_bin() -> Path:
    """The server binary: cargo's release build of this checkout."""
    given = os.environ.get("HOPPER_SERVER_BIN")
    if given:
        return Path(given)
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--bin", "hopper-delegation"],
        cwd=REPO,
        check=True,
    )
    return REPO / "target" / "release" / "hopper-delegation"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", "-q", "-v", "ON_ERROR_STOP=1", ADMIN_URL, "-c", sql],
        check=True,
        capture_output=True,
    )


def postgres_up() -> bool:
    return (
        shutil.which("pg_isready") is not None
        and subprocess.run(
            ["pg_isready", "-q", "-d", ADMIN_URL], check=False, capture_output=True
        ).returncode
        == 0
    )


@dataclass
class Database:
    """A fresh database of one backend, for one test."""

    backend: str
    url: str
    name: str | None = None

    def drop(self) -> None:
        if self.name is not None:
            _psql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


@contextlib.contextmanager
def fresh_postgres() -> Iterator[Database]:
    """A PostgreSQL database of its own, dropped afterwards; skipped (or, where PostgreSQL is
    required, failed) when no server answers."""
    if not postgres_up():
        if POSTGRES_REQUIRED:
            pytest.fail(f"PostgreSQL is required and not running at {ADMIN_URL}")
        pytest.skip("PostgreSQL is not running")
    name = f"hopper_py_{uuid.uuid4().hex[:12]}"
    _psql(f"CREATE DATABASE {name}")
    parts = urlsplit(ADMIN_URL)
    db = Database("postgres", urlunsplit(parts._replace(path=f"/{name}")), name)
    try:
        yield db
    finally:
        db.drop()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A fresh database on each backend."""
    if request.param == "sqlite":
        yield Database("sqlite", f"sqlite://{tmp_path / 'hopper.db'}")
    else:
        with fresh_postgres() as db:
            yield db


@pytest.fixture
def postgres() -> Iterator[Database]:
    """A fresh PostgreSQL database (for what only PostgreSQL can do: several replicas)."""
    with fresh_postgres() as db:
        yield db


@dataclass
class Server:
    """One server process; :meth:`kill` and :meth:`start` again keep its port and database."""

    binary: Path
    database: Database
    workdir: Path
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    tls_ca: Path | None = None
    starts: int = 0

    @property
    def target(self) -> str:
        scheme = "https" if self.tls_ca else "http"
        host = "localhost" if self.tls_ca else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"

    def start(self, timeout: float = 60.0) -> Server:
        self.starts += 1
        log = open(self.workdir / f"server-{self.port}-{self.starts}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                str(self.binary),
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--database-url",
                self.database.url,
                "--progress-interval",
                "300ms",
                *self.args,
            ],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"server on {self.port} did not start: {self.log()}")

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.workdir.glob("server-*.log"))

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the streams."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: the connections stay open and nothing comes back (a hung server)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class MakeServer(Protocol):
    """Makes a server (not started yet) over ``database`` with extra ``serve`` arguments."""

    def __call__(self, database: Database, args: list[str] | None = None) -> Server: ...


@pytest.fixture
def make_server(server_bin: Path, tmp_path: Path) -> Iterator[MakeServer]:
    """Makes servers that are all stopped when the test ends."""
    made: list[Server] = []

    def make(database: Database, args: list[str] | None = None) -> Server:
        server = Server(server_bin, database, tmp_path, list(args or []))
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def server(make_server: MakeServer, database: Database) -> Server:
    """A running server over a fresh database, on each backend."""
    return make_server(database).start()
