"""The audit trail: one log line and one database row per API request.

The request's method, path and id are client-controlled: the trail stores and logs them
*printable* (:meth:`AuditEntry.printable`): the path percent-encoded as a client would
send it (``/operations/x%0A2026-...``, never a line feed or a terminal escape), each
value cut to its column's length, so one request is one line and one row, and the row
holds exactly what the line shows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from ai_platform.usage import statements
from ai_platform.usage.database import Database, describe
from ai_platform.usage.models import AuditRecord

log = logging.getLogger("ai_platform.audit")

PRUNE_EVERY = timedelta(hours=1)
# Rows kept for a database that refuses writes, retried with back-off; beyond that the oldest
# are dropped (each is in platform.log too, written when it happened).
MAX_BACKLOG = 20_000
FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS = 0.5, 30.0

# The lengths of AuditRecord's columns (PostgreSQL refuses longer values, and with them the whole batch).
METHOD_MAX, PATH_MAX, REQUEST_ID_MAX = 8, 256, 128
TRUNCATED = "\u2026"  # "…": never part of a percent-encoded value, so it marks a cut unambiguously
# What a path keeps as it is (RFC 3986 pchar and "/"); everything else is percent-encoded, spaces included.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# An HTTP method is a token (RFC 9110); request ids are validated as printable ASCII without spaces.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def _encoded(value: str, safe: str, limit: int) -> str:
    """``value`` percent-encoded (UTF-8), at most ``limit`` characters: if longer, as many whole characters as fit
    in ``limit - 1``, then "…"."""
    encoded = quote(value, safe=safe, errors="backslashreplace")
    if len(encoded) <= limit:
        return encoded
    parts, size = [], 0
    for char in value:
        part = quote(char, safe=safe, errors="backslashreplace")
        if size + len(part) > limit - 1:
            break
        parts.append(part)
        size += len(part)
    return "".join(parts) + TRUNCATED


def printable_path(path: str) -> str:
    """``path`` percent-encoded as a client would send it (a normal path is unchanged), at most ``PATH_MAX``
    characters."""
    return _encoded(path, _PATH_SAFE, PATH_MAX)


@dataclass(frozen=True)
class AuditEntry:
    """One ``AuditRecord`` row, its fields in the table's column order."""

    timestamp: datetime
    request_id: str | None
    method: str
    path: str
    operation: str | None
    key_id: str | None
    status: int
    duration_ms: float
    output_tokens: int

    def printable(self) -> AuditEntry:
        """This entry with its client-controlled values made printable and cut to their columns' lengths."""
        method = self.method if _TOKEN.fullmatch(self.method) else quote(self.method, safe="")
        request_id = self.request_id
        if request_id is not None and not (len(request_id) <= REQUEST_ID_MAX and _PRINTABLE.fullmatch(request_id)):
            request_id = _encoded(request_id, "", REQUEST_ID_MAX)
        return dataclasses.replace(
            self, method=method[:METHOD_MAX], path=printable_path(self.path), request_id=request_id
        )


class AuditTrail:
    """One log line per request at once; the database rows in batches, one transaction each.

    Rows wait at most ``flush_seconds`` (or until ``max_pending`` are waiting), so a
    busy server writes one transaction per batch instead of one per request and no
    request waits for its own audit row. A killed process loses at most the rows of
    its last ``flush_seconds``; the log lines are written as they happen. A batch the
    database refuses is kept and retried with back-off (0.5 s doubling to 30 s; at most
    ``MAX_BACKLOG`` rows, the oldest dropped beyond), and ``/health`` says writes fail. Rows older
    than ``retention_days`` (0: none) are deleted after a write, at most once per
    ``PRUNE_EVERY``, so the table cannot grow without bound (unauthenticated
    requests are audited too).
    """

    def __init__(
        self, database: Database, *, flush_seconds: float = 0.1, max_pending: int = 256, retention_days: int = 0
    ) -> None:
        self._database = database
        self._flush_seconds = flush_seconds
        self._max_pending = max_pending
        self._retention = timedelta(days=retention_days)
        self._pruned_at: datetime | None = None
        self._pending: list[AuditEntry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._failures = 0  # failed attempts in a row
        self.dropped = 0  # rows given up on (over MAX_BACKLOG while the database refused writes)

    def record(self, entry: AuditEntry) -> None:
        """Log ``entry`` and queue its row, both printable (:meth:`AuditEntry.printable`).

        Never raises: auditing must not fail a request.
        """
        entry = entry.printable()
        log.info(
            "request method=%s path=%s operation=%s key_id=%s status=%d duration_ms=%.1f tokens=%d request_id=%s",
            entry.method,
            entry.path,
            entry.operation or "-",
            entry.key_id or "-",
            entry.status,
            entry.duration_ms,
            entry.output_tokens,
            entry.request_id or "-",
        )
        self._pending.append(entry)
        if self._writing is not None:
            return  # the running write takes it along
        if len(self._pending) >= self._max_pending:
            self._write_now()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_seconds, self._write_now)

    def _write_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is None:
            self._writing = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        try:
            while self._pending:
                batch = list(self._pending)  # record() appends to _pending meanwhile
                try:
                    await self._database.transactions().run(
                        statements.audit_rows([tuple(vars(e).values()) for e in batch])
                    )
                except Exception as exc:
                    await self._wait_to_retry(exc)
                    continue
                self._pending = self._pending[len(batch) :]  # rows recorded meanwhile stay queued
                if self._failures:
                    log.warning("wrote %d audit records after %d failed attempts", len(batch), self._failures)
                    self._failures = 0
                    self._database.note_write(None)
            await self._prune()
        finally:
            self._writing = None

    async def _wait_to_retry(self, error: Exception) -> None:
        """Keep the rows (at most ``MAX_BACKLOG``, the newest) and wait before the next attempt."""
        self._failures += 1
        if self._database.is_open():  # (while it is not open yet, /health says so already)
            self._database.note_write(error)
        if len(self._pending) > MAX_BACKLOG:
            dropped = len(self._pending) - MAX_BACKLOG
            self._pending = self._pending[dropped:]
            self.dropped += dropped
            log.error(
                "dropped the %d oldest audit records: over %d waiting (they are in the log)", dropped, MAX_BACKLOG
            )
        delay = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (self._failures - 1))
        if not self._database.is_open():
            delay = min(delay, 2.0)  # the rows go in soon after the database opens
        if self._failures == 1:
            log.exception("could not write %d audit records; retrying in %g s", len(self._pending), delay)
        else:
            log.warning(
                "could not write %d audit records (attempt %d): %s; retrying in %g s",
                len(self._pending), self._failures, describe(error), delay,
            )  # fmt: skip
        await asyncio.sleep(delay)

    async def _prune(self) -> None:
        now = datetime.now(UTC)
        if not self._retention or (self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY):
            return
        self._pruned_at = now
        try:
            if deleted := await AuditRecord.filter(timestamp__lt=now - self._retention).delete():
                log.info("deleted %d audit records older than %d days", deleted, self._retention.days)
        except Exception:
            log.exception("could not delete old audit records")

    async def flush(self, timeout: float | None = None) -> None:
        """Write every queued row now (at shutdown, and for tests that read the table).

        With a ``timeout``, a database that keeps refusing writes is given up on after it
        (the rows stay in the log only).
        """
        self._write_now()
        if self._writing is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._writing)
        except TimeoutError:
            self._writing.cancel()
            log.error("gave up writing %d audit records after %g s (they are in the log)", len(self._pending), timeout)
