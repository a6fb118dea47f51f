"""The statements every request runs: take a place under a limit, record the reservation, settle it, audit.

They run on the connection of a Tortoise transaction (``in_transaction()``), as
SQL written once for SQLite and PostgreSQL, because they are the whole per-request
cost of the usage layer: built through the ORM, admission took seven queries (the
limit, the key's quota, an UPDATE and a SELECT per counter, the INSERT) and
~2.8 ms of Python query building per request on the development machine. Here a
counter's limit is read inside its own conditional UPDATE, which returns the new
count (``RETURNING``), so admission is three statements (four for a key's first request of the day) and still exact across
processes: the limit is whatever the row says when the UPDATE runs.
The audit row is one INSERT, without building a model instance. Everything else
(admin reads and writes, sweeps, migrations) stays on the ORM models.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any, NamedTuple

from tortoise.backends.base.client import BaseDBAsyncClient

# A key with no quota row may take any number of places: the UPDATE compares against count + 1.
_TAKE = {
    "operation": """
        UPDATE daily_usage SET request_count = request_count + 1
        WHERE operation = ? AND day = ?
          AND request_count < COALESCE((SELECT l.daily_limit FROM operation_limit AS l WHERE l.operation = ?), ?)
        RETURNING request_count,
          COALESCE((SELECT l.daily_limit FROM operation_limit AS l WHERE l.operation = ?), ?) AS daily_limit""",
    "key": """
        UPDATE key_daily_usage SET request_count = request_count + 1
        WHERE key_id = ? AND operation = ? AND day = ?
          AND request_count < COALESCE(
            (SELECT q.daily_limit FROM key_quota AS q WHERE q.key_id = ? AND q.operation = ?), request_count + 1)
        RETURNING request_count,
          (SELECT q.daily_limit FROM key_quota AS q WHERE q.key_id = ? AND q.operation = ?) AS daily_limit""",
}
_CREATE = {
    "operation": """
        INSERT INTO daily_usage (operation, day, request_count, total_tokens) VALUES (?, ?, 0, 0)
        ON CONFLICT DO NOTHING""",
    "key": """
        INSERT INTO key_daily_usage (key_id, operation, day, request_count, total_tokens) VALUES (?, ?, ?, 0, 0)
        ON CONFLICT DO NOTHING""",
}
_LIMITS = """
    SELECT (SELECT l.daily_limit FROM operation_limit AS l WHERE l.operation = ?) AS operation_limit,
           (SELECT q.daily_limit FROM key_quota AS q WHERE q.key_id = ? AND q.operation = ?) AS key_limit"""
_RESERVE = """
    INSERT INTO reservation (operation, key_id, day, host, pid, process_started, expires_at)
    VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id"""
_AUDIT = """
    INSERT INTO audit_record
      (timestamp, request_id, method, path, operation, key_id, status, duration_ms, output_tokens)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_SETTLE = "DELETE FROM reservation WHERE id = ? RETURNING id"
_COUNT = (
    """UPDATE daily_usage SET request_count = request_count + ?, total_tokens = total_tokens + ?
       WHERE operation = ? AND day = ?""",
    """UPDATE key_daily_usage SET request_count = request_count + ?, total_tokens = total_tokens + ?
       WHERE key_id = ? AND operation = ? AND day = ?""",
)


def _numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, …``."""
    counter = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


async def _rows(conn: BaseDBAsyncClient, sql: str, *values: Any) -> list[dict[str, Any]]:
    # execute_query_dict fetches rows on both backends (asyncpg's execute_query drops RETURNING rows).
    if conn.capabilities.dialect == "postgres":
        sql = _numbered(sql)
    return await conn.execute_query_dict(sql, list(values))


class Taken(NamedTuple):
    """A counter after taking a place: its new count and the limit it was checked against."""

    used: int
    limit: int | None  # None: no limit on this counter (a key without a quota)


async def take(
    conn: BaseDBAsyncClient, operation: str, key_id: str, day: date, default_limit: int
) -> tuple[Taken | None, Taken | None]:
    """Count one more request on the operation's row, then the key's.

    ``(None, None)``: the operation is at its limit (nothing changed); ``(taken, None)``:
    the key is at its quota (the caller rolls the transaction back).
    """
    where = (operation, day, operation, default_limit, operation, default_limit)
    taken = await _take(conn, "operation", where, (operation, day))
    if taken is None:
        return None, None
    key_where = (key_id, operation, day, key_id, operation, key_id, operation)
    return taken, await _take(conn, "key", key_where, (key_id, operation, day))


async def _take(conn: BaseDBAsyncClient, counter: str, where: tuple[Any, ...], row: tuple[Any, ...]) -> Taken | None:
    if not (rows := await _rows(conn, _TAKE[counter], *where)):
        # No row yet, or full. Create it unless it exists and ask again: only an UPDATE that
        # sees the row (PostgreSQL re-reads it) may say "full", or a burst of first requests
        # would be refused with the allowance untouched.
        await _rows(conn, _CREATE[counter], *row)
        if not (rows := await _rows(conn, _TAKE[counter], *where)):
            return None
    return Taken(int(rows[0]["request_count"]), rows[0]["daily_limit"])


async def limits(conn: BaseDBAsyncClient, operation: str, key_id: str) -> tuple[int | None, int | None]:
    """The admin's override of the operation's limit and the key's quota (None where unset)."""
    row = (await _rows(conn, _LIMITS, operation, key_id, operation))[0]
    return row["operation_limit"], row["key_limit"]


async def reserve(
    conn: BaseDBAsyncClient,
    operation: str,
    key_id: str,
    day: date,
    owner: tuple[str, int, float],
    expires_at: datetime,
) -> int:
    """Insert the reservation row of an admitted request; its id."""
    rows = await _rows(conn, _RESERVE, operation, key_id, day, *owner, expires_at)
    return int(rows[0]["id"])


async def settle(conn: BaseDBAsyncClient, reservation_id: int) -> bool:
    """Delete the reservation; False if someone else (a sweep) already settled it."""
    return bool(await _rows(conn, _SETTLE, reservation_id))


async def count(conn: BaseDBAsyncClient, operation: str, key_id: str, day: date, requests: int, tokens: int) -> None:
    """Adjust the operation's and the key's counters together (always in this order, so no deadlock)."""
    if not (requests or tokens):
        return
    await _rows(conn, _COUNT[0], requests, tokens, operation, day)
    await _rows(conn, _COUNT[1], requests, tokens, key_id, operation, day)


async def audit(conn: BaseDBAsyncClient, *values: Any) -> None:
    """Insert one ``audit_record`` row (the columns in the model's order, without ``id``)."""
    await _rows(conn, _AUDIT, *values)
