"""The limit transactions every request runs, admission and settlement, as plain SQL.

Plain SQL rather than ORM queries for the reason ``ai_platform.usage.statements`` gives
(they are the per-request cost); they run on its runners. A counter's limit is read
inside its own conditional UPDATE, which returns the new count (``RETURNING``):
admission is three statements and still exact across processes, as the limit is
whatever the row says when the UPDATE runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, NamedTuple

from ai_platform.usage.statements import Transaction, Undone

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
_FULL = """
    SELECT COALESCE((SELECT u.request_count FROM daily_usage AS u WHERE u.operation = ? AND u.day = ?), 0) AS used,
           COALESCE((SELECT l.daily_limit FROM operation_limit AS l WHERE l.operation = ?), ?) AS daily_limit,
           COALESCE((SELECT k.request_count FROM key_daily_usage AS k
                     WHERE k.key_id = ? AND k.operation = ? AND k.day = ?), 0) AS key_used,
           (SELECT q.daily_limit FROM key_quota AS q WHERE q.key_id = ? AND q.operation = ?) AS key_limit,
           (SELECT COUNT(*) FROM reservation AS r WHERE r.operation = ? AND r.day = ?) AS in_progress,
           (SELECT COUNT(*) FROM reservation AS r
            WHERE r.key_id = ? AND r.operation = ? AND r.day = ?) AS key_in_progress"""
_RESERVE = """
    INSERT INTO reservation (operation, key_id, day, host, pid, process_started, expires_at)
    VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id"""
_SETTLE = "DELETE FROM reservation WHERE id = ? RETURNING id"
_COUNT = (
    """UPDATE daily_usage SET request_count = request_count + ?, total_tokens = total_tokens + ?
       WHERE operation = ? AND day = ?""",
    """UPDATE key_daily_usage SET request_count = request_count + ?, total_tokens = total_tokens + ?
       WHERE key_id = ? AND operation = ? AND day = ?""",
)


class Taken(NamedTuple):
    """A counter after taking a place: its new count and the limit it was checked against."""

    used: int
    limit: int | None  # None: no limit on this counter (a key without a quota)


class Admitted(NamedTuple):
    reservation_id: int
    operation: Taken
    key: Taken


@dataclass(frozen=True)
class Refused(Undone):
    """Nothing was taken (the transaction is rolled back); the counts and limits for the message."""

    key_quota: bool  # the key's quota was full (else the operation's limit)
    used: int  # places taken on the full counter: requests counted today plus those in progress
    limit: int
    in_progress: int  # of ``used``: admitted requests not settled yet (their reservation rows)

    @property
    def done(self) -> int:
        """Requests counted today (succeeded), without those still in progress."""
        return max(self.used - self.in_progress, 0)


def admission(
    operation: str,
    key_id: str,
    day: date,
    default_limit: int,
    owner: tuple[str, int, float],
    expires_at: datetime,
) -> Transaction[Admitted | Refused]:
    """Count one more request on the operation's row, then the key's, then record the reservation.

    Returns :class:`Refused` when a counter is full: the caller must roll back (the
    runners do, as Refused is :class:`~ai_platform.usage.statements.Undone`), so a full key quota gives the operation's
    place back too.
    """
    where = (operation, day, operation, default_limit, operation, default_limit)
    taken = yield from _take("operation", where, row=(operation, day))
    key_taken = None
    if taken is not None:
        key_where = (key_id, operation, day, key_id, operation, key_id, operation)
        key_taken = yield from _take("key", key_where, row=(key_id, operation, day))
    if taken is None or key_taken is None:
        counts = (operation, day, operation, default_limit, key_id, operation, day, key_id, operation)
        [full] = yield _FULL, (*counts, operation, day, key_id, operation, day)
        if taken is None:
            return Refused(False, full["used"], full["daily_limit"], full["in_progress"])
        return Refused(True, full["key_used"], full["key_limit"], full["key_in_progress"])
    [row] = yield _RESERVE, (operation, key_id, day, *owner, expires_at)
    return Admitted(int(row["id"]), taken, key_taken)


def _take(counter: str, where: tuple[Any, ...], *, row: tuple[Any, ...]) -> Transaction[Taken | None]:
    if not (rows := (yield _TAKE[counter], where)):
        # No row yet, or full. Create it unless it exists and ask again: only an UPDATE that
        # sees the row (PostgreSQL re-reads it) may say "full", or a burst of first requests
        # would be refused with the allowance untouched.
        yield _CREATE[counter], row
        if not (rows := (yield _TAKE[counter], where)):
            return None
    return Taken(int(rows[0]["request_count"]), rows[0]["daily_limit"])


def settlement(reservation_id: int, operation: str, key_id: str, day: date, *, tokens: int | None) -> Transaction[bool]:
    """Delete the reservation and adjust the counters; False if someone else already settled it.

    ``tokens`` is the output of a request that succeeded (its place is kept); None gives
    the place back. A success whose reservation was already swept (its process stalled
    past the lease) is counted again, since it did succeed.
    """
    settled = bool((yield _SETTLE, (reservation_id,)))
    if tokens is None:
        if settled:
            yield from _count(operation, key_id, day, -1, 0)
        return settled
    yield from _count(operation, key_id, day, 0 if settled else 1, tokens)
    return settled


def _count(operation: str, key_id: str, day: date, requests: int, tokens: int) -> Transaction[None]:
    # Always the operation's row first, then the key's: the same order as admission, so no deadlock.
    if requests or tokens:
        yield _COUNT[0], (requests, tokens, operation, day)
        yield _COUNT[1], (requests, tokens, key_id, operation, day)
