"""Audit rows survive a database that briefly refuses writes, and /health says so (issue 11, item 8)."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import PlatformPlugin, create_app
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from ai_platform.usage import audit
from ai_platform.usage.audit import AuditEntry, AuditTrail
from ai_platform.usage.database import Database
from ai_platform.usage.models import AuditRecord
from support import ADMIN, KEY, SEED_MODELS

pytestmark = pytest.mark.anyio


class RefusingWrites:
    """The database's runner: refuses every transaction while ``refusing`` (a read-only SQLite file)."""

    def __init__(self, database: Database) -> None:
        self.refusing = True
        self.attempts = 0
        self.transactions = database.transactions  # the real one

    def __call__(self) -> Any:
        real = self.transactions()
        outer = self

        class Runner:
            async def run(self, transaction: Any) -> Any:
                outer.attempts += 1
                if outer.refusing:
                    transaction.close()
                    raise sqlite3.OperationalError("attempt to write a readonly database")
                return await real.run(transaction)

        return Runner()


def audit_rows(env: dict[str, str], path: str) -> int:
    connection = sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite://"))
    try:
        return int(connection.execute("SELECT COUNT(*) FROM audit_record WHERE path = ?", (path,)).fetchone()[0])
    finally:
        connection.close()


async def wait_for(condition: Any, seconds: float = 15) -> None:
    async with asyncio.timeout(seconds):
        while not await condition():
            await asyncio.sleep(0.05)


async def test_refused_rows_are_retried_and_health_says_writes_fail(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(Settings.from_mapping(env), engine=FakeEngine(models=dict(SEED_MODELS)))
    database = app.plugins.get(PlatformPlugin).database
    refusing = RefusingWrites(database)
    monkeypatch.setattr(database, "transactions", refusing)
    async with AsyncTestClient(app) as client:
        for _ in range(5):
            assert (await client.get("/limits", headers=KEY)).status_code == 200

        async def health_shows_it() -> bool:
            return (await client.get("/health", headers=ADMIN)).json()["status"] == "degraded"

        await wait_for(health_shows_it)
        body = (await client.get("/health", headers=ADMIN)).json()
        assert body["database"]["available"] is False
        assert "writes fail" in body["database"]["error"] and "readonly" in body["database"]["error"]
        assert audit_rows(env, "/limits") == 0
        attempts = refusing.attempts
        await asyncio.sleep(1.6)
        assert 2 <= refusing.attempts - attempts <= 4  # retried with back-off, not every 0.1 s

        refusing.refusing = False  # the database takes writes again: nothing was lost

        async def all_written() -> bool:
            return audit_rows(env, "/limits") == 5

        await wait_for(all_written)
        assert (await client.get("/health", headers=ADMIN)).json()["status"] == "healthy"


async def test_the_backlog_is_bounded_and_a_flush_gives_up_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = Database(f"sqlite://{tmp_path}/audit.sqlite3")
    refusing = RefusingWrites(database)
    monkeypatch.setattr(database, "transactions", refusing)
    monkeypatch.setattr(audit, "MAX_BACKLOG", 10)
    async with database.opened():
        trail = AuditTrail(database, flush_seconds=0.01)
        entry = AuditEntry(datetime.now(UTC), None, "GET", "/health", None, None, 200, 1.0, 0)
        for _ in range(25):
            trail.record(entry)
            await asyncio.sleep(0)
        async with asyncio.timeout(5):
            while trail.dropped == 0:
                await asyncio.sleep(0.01)
        await trail.flush(timeout=0.5)  # shutdown does not hang on a database that refuses writes
        assert trail.dropped >= 15
        assert await AuditRecord.all().count() == 0
