"""Where the per-request transactions run (the runners), and the audit rows, as plain SQL.

Every request runs a few transactions: admission and settlement (``ai_platform.limits.statements``)
and its audit row (here). They are the whole per-request cost of the usage layer, so they are
written as SQL once for SQLite and PostgreSQL instead of ORM queries (built through the ORM,
admission alone was seven queries and ~2.8 ms on the development machine).

Each transaction is a generator that yields ``(sql, values)`` and receives the rows,
so one definition runs on both drivers: on PostgreSQL statement by statement on a
Tortoise transaction; on SQLite whole, in one call on a thread that owns a
connection of its own, instead of one thread hop per statement through aiosqlite
(each hop cost ~0.2 ms under load, ten per request). Everything else (admin reads
and writes, sweeps, migrations) stays on the ORM models.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

T = TypeVar("T")
Rows = list[dict[str, Any]]
Transaction = Generator[tuple[str, tuple[Any, ...]], Rows, T]

_AUDIT = """
    INSERT INTO audit_record
      (timestamp, request_id, method, path, operation, key_id, status, duration_ms, output_tokens)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"""


def audit_rows(rows: list[tuple[Any, ...]]) -> Transaction[None]:
    """Insert ``audit_record`` rows (each with the columns in the model's order, without ``id``)."""
    for values in rows:
        yield _AUDIT, values


# -- the runners ----------------------------------------------------------------------


class Undone:
    """Base of a transaction's result that undoes the transaction: the runners roll back, then return it.

    (A refused admission: ``ai_platform.limits.statements.Refused``.)
    """


class Runner(Protocol):
    async def run(self, transaction: Transaction[T]) -> T:
        """Run ``transaction`` atomically; rolled back if it raises or returns an :class:`Undone`."""
        ...

    def close(self) -> None: ...


class _Rollback(Exception):
    def __init__(self, result: object) -> None:
        self.result = result


def _numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, …``."""
    counter = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


class TortoiseRunner:
    """Statement by statement on a Tortoise transaction (PostgreSQL: no thread hops to save)."""

    def __init__(self, client: BaseDBAsyncClient) -> None:
        self._postgres = client.capabilities.dialect == "postgres"

    async def run(self, transaction: Transaction[T]) -> T:
        try:
            async with in_transaction() as conn:
                result = await self._drive(conn, transaction)
                if isinstance(result, Undone):
                    raise _Rollback(result)
                return result
        except _Rollback as rollback:
            return rollback.result  # type: ignore[return-value]

    async def _drive(self, conn: BaseDBAsyncClient, transaction: Transaction[T]) -> T:
        try:
            sql, values = next(transaction)
            while True:
                # execute_query_dict fetches rows on both backends (asyncpg's execute_query drops RETURNING rows).
                rows = await conn.execute_query_dict(_numbered(sql) if self._postgres else sql, list(values))
                sql, values = transaction.send(rows)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def close(self) -> None:
        return None


class SqliteRunner:
    """Whole transactions in one call each, on a thread owning its own connection to the database file."""

    def __init__(self, filename: str, pragmas: dict[str, Any]) -> None:
        self._filename = filename
        self._pragmas = pragmas
        self._connection: sqlite3.Connection | None = None
        # One thread: the connection is used by it alone, and SQLite has one writer at a time anyway.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-sqlite")

    async def run(self, transaction: Transaction[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._run, transaction)

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(self._filename, isolation_level=None)
            connection.row_factory = sqlite3.Row
            for pragma, value in self._pragmas.items():  # those Tortoise's own connection applied
                connection.execute(f"PRAGMA {pragma}={value}")
            self._connection = connection
        return self._connection

    def _run(self, transaction: Transaction[T]) -> T:
        connection = self._connect()
        # IMMEDIATE: take the write lock up front (waiting up to busy_timeout), so a
        # read-to-write upgrade inside the transaction can never fail.
        connection.execute("BEGIN IMMEDIATE")
        try:
            sql, values = next(transaction)
            while True:
                rows = [dict(row) for row in connection.execute(sql, values).fetchall()]
                sql, values = transaction.send(rows)
        except StopIteration as done:
            result: T = done.value
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("ROLLBACK" if isinstance(result, Undone) else "COMMIT")
        return result

    def close(self) -> None:
        def close_connection() -> None:
            if self._connection is not None:
                self._connection.close()

        self._thread.submit(close_connection).result()
        self._thread.shutdown()


def runner_for(client: BaseDBAsyncClient) -> Runner:
    """The runner that suits the database behind Tortoise's ``client``."""
    if client.capabilities.dialect == "sqlite" and getattr(client, "filename", ":memory:") != ":memory:":
        return SqliteRunner(client.filename, dict(client.pragmas))  # type: ignore[attr-defined]
    return TortoiseRunner(client)
