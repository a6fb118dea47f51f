"""Timestamps as the API writes them (responses' ``timestamp``, ``generated_at``)."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``, as in the seed (``2025-01-15T10:30:00.000Z``)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
