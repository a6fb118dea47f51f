"""The audit trail: one log line and one database row per API request."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ai_platform.usage import statements
from ai_platform.usage.database import transactions
from ai_platform.usage.models import AuditRecord

log = logging.getLogger("ai_platform.audit")

PRUNE_EVERY = timedelta(hours=1)


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


class AuditTrail:
    """One log line per request at once; the database rows in batches, one transaction each.

    Rows wait at most ``flush_seconds`` (or until ``max_pending`` are waiting), so a
    busy server writes one transaction per batch instead of one per request and no
    request waits for its own audit row. A killed process loses at most the rows of
    its last ``flush_seconds``; the log lines are written as they happen. Rows older
    than ``retention_days`` (0: none) are deleted after a write, at most once per
    ``PRUNE_EVERY``, so the table cannot grow without bound (unauthenticated
    requests are audited too).
    """

    def __init__(self, *, flush_seconds: float = 0.1, max_pending: int = 256, retention_days: int = 0) -> None:
        self._flush_seconds = flush_seconds
        self._max_pending = max_pending
        self._retention = timedelta(days=retention_days)
        self._pruned_at: datetime | None = None
        self._pending: list[AuditEntry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None

    def record(self, entry: AuditEntry) -> None:
        """Log ``entry`` and queue its row. Never raises: auditing must not fail a request."""
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
                batch, self._pending = self._pending, []
                try:
                    await transactions().run(statements.audit_rows([tuple(vars(e).values()) for e in batch]))
                except Exception:
                    log.exception("could not write %d audit records", len(batch))
            await self._prune()
        finally:
            self._writing = None

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

    async def flush(self) -> None:
        """Write every queued row now (at shutdown, and for tests that read the table)."""
        self._write_now()
        if self._writing is not None:
            await asyncio.shield(self._writing)
