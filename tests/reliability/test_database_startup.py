"""A database that is down when the server starts: the server serves anyway, says so, and connects by itself.

Under systemd the server may start before PostgreSQL (or before the disk holding the SQLite
file is ready). It used to refuse to start; now it listens at once, ``/health`` reports the
database as unavailable and why, every call that needs it answers 503 with ``Retry-After``
(never 500), and it keeps trying in the background until the database is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.errors import ConfigurationError
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from ai_platform.usage.database import UNAVAILABLE
from harness import PostgresServer, ServerProcess, pg_bindir, query
from support import ADMIN, CLASSIFY, KEY, SEED_MODELS, SUMMARIZE

# Every call that needs the database, with the key it needs.
NEEDS_DATABASE = [
    ("POST", "/operations/summarize", SUMMARIZE, KEY),
    ("POST", "/operations/classify", CLASSIFY, KEY),
    ("GET", "/limits", None, KEY),
    ("GET", "/limits/usage", None, KEY),
    ("GET", "/usage/keys/me", None, KEY),
    ("GET", "/usage/keys", None, ADMIN),
    ("GET", "/quotas", None, ADMIN),
    ("PUT", "/limits", {"operation": "summarize", "daily_limit": 5}, ADMIN),
]


def _assert_all_503(responses: list[httpx.Response]) -> None:
    for r in responses:
        assert r.status_code == 503, (r.request.url, r.status_code, r.text)
        assert r.json() == {"detail": UNAVAILABLE}
        assert 1 <= int(r.headers["Retry-After"]) <= 31  # when the next attempt to open it runs


def _summarize_usage(body: dict[str, object]) -> int:
    return next(u["request_count"] for u in body["usage"] if u["operation"] == "summarize")  # type: ignore[attr-defined,index]


@pytest.mark.anyio
async def test_sqlite_folder_not_there_yet_then_fixed(env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the database's folder should be")
    settings = Settings.from_mapping({**env, "DATABASE_URL": f"sqlite://{blocker / 'usage.sqlite3'}"})
    async with AsyncTestClient(create_app(settings, engine=FakeEngine(models=dict(SEED_MODELS)))) as client:
        health = (await client.get("/health", headers=ADMIN)).json()
        assert health["status"] == "degraded"
        assert health["database"]["available"] is False
        assert health["database"]["error"].startswith("FileExistsError: ")
        assert 0 <= health["database"]["next_attempt_seconds"] <= 1.1
        _assert_all_503([await client.request(m, p, json=b, headers=h) for m, p, b, h in NEEDS_DATABASE])

        blocker.unlink()  # the admin fixes it; nobody restarts anything
        async with asyncio.timeout(20):
            while not (health := (await client.get("/health", headers=ADMIN)).json())["database"]["available"]:
                await asyncio.sleep(0.2)
        assert health["status"] == "healthy" and health["database"]["error"] is None
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
        assert _summarize_usage((await client.get("/limits/usage", headers=KEY)).json()) == 1
    assert (blocker / "usage.sqlite3").stat().st_mode & 0o777 == 0o600
    log = (Path(env["LOG_DIR"]) / "platform.log").read_text()
    assert "WARNING ai_platform.usage.database: usage database unavailable (attempt 1): FileExistsError: " in log
    assert "next attempt in 1." in log or "next attempt in 0.9" in log
    assert "usage database open after " in log


@pytest.mark.anyio
async def test_a_malformed_database_url_still_stops_startup(env: dict[str, str]) -> None:
    # Refused when the settings load (issue 11 #15), before the app or the database is touched.
    with pytest.raises(ConfigurationError, match=r"^DATABASE_URL: unsupported scheme 'mysqlx'"):
        Settings.from_mapping({**env, "DATABASE_URL": "mysqlx://db/usage"})


@pytest.fixture
def postgres_not_started() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster, initialised but not started: the test starts it when it wants."""
    bindir = pg_bindir()
    root = Path(tempfile.mkdtemp(prefix="ai-platform-pg-later-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = PostgresServer(bindir, root)
    server.init()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # never started
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _unexpected_tracebacks(output: str) -> int:
    # The audit trail cannot write (or prune) its rows while the database is down, and says so with a traceback.
    return output.count("Traceback") - output.count("ERROR ai_platform.audit: could not ")


def _wait_for(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_server_starts_before_postgres_and_connects_when_it_comes_up(
    serve: object, postgres_not_started: PostgresServer
) -> None:
    url = postgres_not_started.url("postgres")
    # Both workers finish starting and /health answers, with PostgreSQL still down.
    server: ServerProcess = serve(url, workers=2)  # type: ignore[operator]
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        health = client.get("/health", headers=ADMIN)
        assert health.status_code == 200
        assert health.json()["status"] == "degraded"
        database = health.json()["database"]
        assert database["available"] is False and database["error"].startswith("ConnectionRefusedError: ")
        assert database["next_attempt_seconds"] is not None
        _assert_all_503([client.request(m, p, json=b, headers=h) for m, p, b, h in NEEDS_DATABASE])
        # One line per attempt and worker: what failed, and when the next attempt runs.
        output = server.output.read_text()
        assert output.count("usage database unavailable (attempt 1): ConnectionRefusedError: ") == 2, output
        assert "; next attempt in " in output
        assert _unexpected_tracebacks(output) == 0

        postgres_not_started.start()
        _wait_for(lambda: server.output.read_text().count("usage database open after ") == 2, 60, "both workers")
        for _ in range(6):  # either worker may answer
            health = client.get("/health", headers=ADMIN).json()
            assert health["status"] == "healthy" and health["database"] == {
                "available": True,
                "error": None,
                "next_attempt_seconds": None,
            }
        assert client.post("/operations/summarize", json=SUMMARIZE, headers=KEY).status_code == 200
        assert _summarize_usage(client.get("/limits/usage", headers=KEY).json()) == 1
    # The two workers migrated the new database once, under the lock.
    assert query(url, "SELECT COUNT(*) FROM tortoise_migrations") == [(2,)]
    assert _unexpected_tracebacks(server.output.read_text()) == 0
