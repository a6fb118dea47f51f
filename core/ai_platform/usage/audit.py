"""The audit trail: one database row and one log line per API request."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from datetime import datetime

from tortoise import connections

from ai_platform.usage import statements

log = logging.getLogger("ai_platform.audit")


def key_id(api_key: str, secret_key: str) -> str:
    """A stable, non-reversible id for an API key (HMAC with ``SECRET_KEY``), safe to store and log."""
    return hmac.new(secret_key.encode(), api_key.encode(), hashlib.sha256).hexdigest()[:16]


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


async def record(entry: AuditEntry) -> None:
    """Write ``entry`` to the log and the database. Never raises: auditing must not fail a request."""
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
    try:
        await statements.audit(connections.get("default"), *vars(entry).values())
    except Exception:
        log.exception("could not write audit record for %s %s", entry.method, entry.path)
