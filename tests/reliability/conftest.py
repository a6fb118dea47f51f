"""Fixtures of the reliability suite: a throwaway PostgreSQL server, and server processes: over the fake engine
(``serve``: tests that need a fake, e.g. to hold requests in flight) or the real command (``serve_cli``).

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

from ai_platform.testing import platform_env
from harness import HERE, PostgresServer, ServerProcess, pg_bindir
from support import free_port

AI_PLATFORM = Path(sys.executable).parent / "ai-platform"  # the installed command, as an admin runs it


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


def _stop(servers: list[ServerProcess], *, seconds: float) -> None:
    """SIGTERM each server still running; kill it if it has not stopped after ``seconds``."""
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                server.kill()


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
    _stop(started, seconds=15)


@pytest.fixture
def serve_cli(tmp_path: Path) -> Iterator[object]:
    """``serve_cli(database_url, model_dir, workers=2, **extra_env)``: the real ``ai-platform serve --workers N``.

    Settings come from the environment only (its working folder has no ``.env``), every operation
    on the real runtime over ``model_dir``. Waits until every worker has started.
    """
    started: list[ServerProcess] = []

    def start(database_url: str, model_dir: Path, *, workers: int = 2, **extra: str) -> ServerProcess:
        port = free_port()
        folder = tmp_path / f"server-{port}"
        folder.mkdir()
        settings = platform_env(
            folder,
            DATABASE_URL=database_url,
            MODELS_DIR=str(model_dir.parent),
            DEFAULT_MODEL=model_dir.name,
            OPERATION_MODEL_MAP="{}",
            ENABLED_PLUGINS="summarize,translate,classify",
            **extra,
        )
        variables = {k: v for k, v in os.environ.items() if k not in settings}
        output = folder / "output.log"
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [str(AI_PLATFORM), "serve", "--port", str(port), "--workers", str(workers)],
                env={**variables, **settings},
                cwd=folder,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        server = ServerProcess(process, port, output)
        started.append(server)
        server.wait_ready(workers, seconds=180)
        return server

    yield start
    _stop(started, seconds=30)
