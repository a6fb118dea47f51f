"""The usage database failing under a request: releases that cannot run, statements that fail mid-transaction.

A reservation must be settled exactly once whatever fails: a release that cannot reach the
database never raises (the request's own error is what the client gets) and the sweep
gives the place back later; a transaction whose statement fails leaves nothing of itself
behind, and the connection stays usable.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from tortoise.exceptions import BaseORMException

from ai_platform.app import create_app
from ai_platform.errors import DatabaseUnavailableError
from ai_platform.limits.service import LimitService
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from ai_platform.usage import statements
from ai_platform.usage.database import Database
from ai_platform.usage.models import DailyUsage, KeyDailyUsage
from ai_platform.usage.models import Reservation as ReservationRow
from support import KEY, SEED_MODELS, SUMMARIZE

pytestmark = pytest.mark.anyio

LEASE = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limit_service(database: Database, clock: Clock) -> LimitService:
    from ai_platform_summarize import OPERATION

    return LimitService(database, {"summarize": OPERATION}, default_daily_limit=5, clock=clock, lease_seconds=LEASE)


@pytest.fixture
def service(clock: Clock, db_file: Path) -> LimitService:
    return limit_service(Database(f"sqlite://{db_file}"), clock)


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "usage.sqlite3"


@contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Another process holds SQLite's write lock: writers wait their busy timeout, then fail as 'locked'."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


@contextmanager
def failing(path: Path, table: str, event: str, message: str = "database or disk is full") -> Iterator[None]:
    """Every ``event`` (INSERT, UPDATE, DELETE) on ``table`` fails with ``message``, as a full disk would."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute(f"CREATE TRIGGER fail_{table} BEFORE {event} ON {table} BEGIN SELECT RAISE(ABORT, '{message}'); END")
    try:
        yield
    finally:
        other.execute(f"DROP TRIGGER fail_{table}")
        other.close()


async def counts(day: date) -> tuple[int, int, int]:
    """(operation requests, key requests, reservation rows) on ``day``."""
    operation = await DailyUsage.filter(operation="summarize", day=day).first()
    key = await KeyDailyUsage.filter(operation="summarize", day=day).first()
    return (
        operation.request_count if operation else 0,
        key.request_count if key else 0,
        await ReservationRow.all().count(),
    )


# -- release while the database is down ----------------------------------------------------


async def test_release_while_the_database_is_down_never_raises_and_the_sweep_gives_the_place_back(
    clock: Clock, db_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = limit_service(Database(f"sqlite://{db_file}?busy_timeout=50"), clock)
    async with service.database.opened():
        reservation = await service.admit("summarize", "k1")
        day = reservation.day
        with write_lock(db_file), caplog.at_level(logging.WARNING, logger="ai_platform.limits.service"):
            await service.release(reservation)  # must not raise: the request's own error is what matters
        assert f"could not release reservation {reservation.id} now; the sweep will" in caplog.text
        assert await counts(day) == (1, 1, 1)  # nothing was given back yet, nothing half-done
        assert await service.sweep_expired() == 0  # its lease still runs

        clock.now += timedelta(seconds=LEASE + 1)
        [usage] = await service.usage()  # sweeps expired reservations first
        assert usage.request_count == 0 and usage.remaining == 5
        assert await counts(day) == (0, 0, 0)
        assert await service.sweep_expired() == 0  # given back exactly once
        await service.release(reservation)  # a late release finds nothing to give back
        assert await counts(day) == (0, 0, 0)


async def test_a_failed_request_whose_release_cannot_run_still_answers_its_own_error(
    env: dict[str, str], tmp_path: Path
) -> None:
    db = tmp_path / "locked.sqlite3"
    lock = ExitStack()

    class LockingEngine(FakeEngine):
        async def generate(self, operation: str, call: Any, *, max_output_tokens: int) -> Any:
            # The database becomes unavailable while the model runs; then the model fails too.
            lock.enter_context(write_lock(db))
            raise RuntimeError("model failed")

    engine = LockingEngine(models=dict(SEED_MODELS))
    settings = Settings.from_mapping({**env, "DATABASE_URL": f"sqlite://{db}?busy_timeout=50"})
    async with AsyncTestClient(create_app(settings, engine=engine)) as client:
        with lock:
            r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        assert r.status_code == 500 and r.json() == {"detail": "Internal server error."}
        # Its place stays taken until the lease ends and the sweep gives it back; the reservation row says so.
        usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        assert {u["operation"]: u["request_count"] for u in usage}["summarize"] == 1
        connection = sqlite3.connect(db)
        try:
            assert connection.execute("SELECT COUNT(*) FROM reservation").fetchone() == (1,)
        finally:
            connection.close()


# -- a statement that fails inside a transaction --------------------------------------------


def _insert_then_fail(day: date) -> statements.Transaction[None]:
    yield (
        "INSERT INTO daily_usage (operation, day, request_count, total_tokens) VALUES (?, ?, 7, 70)",
        ("summarize", day),
    )
    yield "UPDATE daily_usage SET request_count = request_count + 1 WHERE operation = ?", ("summarize",)
    yield "INSERT INTO no_such_table VALUES (1)", ()


def _insert(day: date) -> statements.Transaction[None]:
    yield (
        "INSERT INTO daily_usage (operation, day, request_count, total_tokens) VALUES (?, ?, 1, 10)",
        ("summarize", day),
    )


@pytest.mark.parametrize("where", ["file", "memory"])  # SqliteRunner (files) and TortoiseRunner (the others)
async def test_a_failing_statement_rolls_back_its_whole_transaction(where: str, db_file: Path) -> None:
    day = date(2026, 3, 1)
    database = Database(f"sqlite://{db_file}" if where == "file" else "sqlite://:memory:")
    async with database.opened():
        runner = database.transactions()
        expected = statements.SqliteRunner if where == "file" else statements.TortoiseRunner
        assert isinstance(runner, expected)
        with pytest.raises((sqlite3.Error, BaseORMException), match="no such table"):
            await runner.run(_insert_then_fail(day))
        assert await DailyUsage.all().count() == 0  # the statements before the failing one are undone
        await runner.run(_insert(day))  # and the connection is not left inside the failed transaction
        row = await DailyUsage.get(operation="summarize", day=day)
        assert (row.request_count, row.total_tokens) == (1, 10)


async def test_admission_whose_reservation_cannot_be_written_takes_no_place(
    service: LimitService, clock: Clock, db_file: Path
) -> None:
    async with service.database.opened():
        day = clock.now.date()
        with failing(db_file, "reservation", "INSERT"), pytest.raises(DatabaseUnavailableError):
            await service.admit("summarize", "k1")
        # Both counters were incremented before the failing INSERT: both increments are rolled back.
        assert await counts(day) == (0, 0, 0)
        reservation = await service.admit("summarize", "k1")
        assert reservation.rate_limit.remaining == 4
        assert await counts(day) == (1, 1, 1)


async def test_a_commit_that_fails_midway_keeps_the_reservation_to_settle_once(
    service: LimitService, clock: Clock, db_file: Path
) -> None:
    async with service.database.opened():
        day = clock.now.date()
        reservation = await service.admit("summarize", "k1")
        # The reservation's DELETE runs, then the key's counter UPDATE fails: the DELETE must be undone.
        with failing(db_file, "key_daily_usage", "UPDATE"), pytest.raises(DatabaseUnavailableError):
            await service.commit(reservation, tokens=9)
        assert await counts(day) == (1, 1, 1)
        assert (await DailyUsage.get(operation="summarize", day=day)).total_tokens == 0
        # Settled later exactly once, by the sweep once its lease ends.
        clock.now += timedelta(seconds=LEASE + 1)
        assert await service.sweep_expired() == 1
        assert await counts(day) == (0, 0, 0)
        assert await service.sweep_expired() == 0
