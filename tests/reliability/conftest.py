"""Fixtures of the reliability suite: a throwaway PostgreSQL server and server processes over the fake engine.

The PostgreSQL tests need the server binaries of the Debian package
``postgresql`` (``.ci/run`` installs it); without them they fail and say so.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tortoise.backends.base.executor import EXECUTOR_CACHE

from harness import HERE, PostgresServer, ServerProcess, pg_bindir
from support import free_port


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix="ai-platform-pg-"))
    server = PostgresServer(pg_bindir(), root)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test that takes this runs once on SQLite and once on PostgreSQL."""
    # Tortoise caches each table's INSERT per connection name, not per dialect: a process that
    # switches database kinds (only tests do) must drop it, or PostgreSQL gets SQLite's "?".
    EXECUTOR_CACHE.clear()
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'usage.sqlite3'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        yield server.new_database()
    EXECUTOR_CACHE.clear()


@pytest.fixture
def serve(env: dict[str, str], tmp_path: Path) -> Iterator[object]:
    """``serve(database_url, workers=1, **extra_env)`` starts ``serve_fake.py`` and waits until it is ready."""
    started: list[ServerProcess] = []

    def start(database_url: str, *, workers: int = 1, wait: bool = True, **extra: str) -> ServerProcess:
        port = free_port()
        output = tmp_path / f"server-{port}.log"
        variables = {**os.environ, **env, "DATABASE_URL": database_url, **extra}
        variables["PYTHONPATH"] = os.pathsep.join([str(HERE), variables.get("PYTHONPATH", "")])
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, str(HERE / "serve_fake.py"), str(port), str(workers)],
                env=variables,
                cwd=tmp_path,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        server = ServerProcess(process, port, output)
        started.append(server)
        if wait:
            server.wait_ready(workers)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
