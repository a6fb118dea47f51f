"""Database tables (Tortoise ORM): the limits' counters, overrides, quotas and reservations (``ai_platform.limits``
uses them) and the audit trail's rows.

One module for all of them: Tortoise loads the models of an app from the modules it is given
(``database.MODELS_MODULE``), and the migrations in ``migrations/`` are written against it.
"""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model


class DailyUsage(Model):
    """Requests and tokens per operation per limit day (a date in LIMIT_TIMEZONE).

    ``request_count`` is reserved atomically before model work and released if
    the request fails, so it counts exactly the requests that succeeded plus
    the ones in flight (each of which has a :class:`Reservation` row).
    """

    id = fields.IntField(primary_key=True)
    operation = fields.CharField(max_length=64)
    day = fields.DateField()
    request_count = fields.IntField(default=0)
    total_tokens = fields.BigIntField(default=0)

    class Meta:
        table = "daily_usage"
        unique_together = (("operation", "day"),)


class OperationLimit(Model):
    """An admin's override of an operation's daily limit (``PUT /limits``)."""

    operation = fields.CharField(max_length=64, primary_key=True)
    daily_limit = fields.IntField()
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "operation_limit"


class KeyQuota(Model):
    """An admin's daily limit for one API key (by key id) on one operation."""

    id = fields.IntField(primary_key=True)
    key_id = fields.CharField(max_length=16)
    operation = fields.CharField(max_length=64)
    daily_limit = fields.IntField()
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "key_quota"
        unique_together = (("key_id", "operation"),)


class KeyDailyUsage(Model):
    """Requests and tokens per API key per operation per limit day, counted like daily usage."""

    id = fields.IntField(primary_key=True)
    key_id = fields.CharField(max_length=16)
    operation = fields.CharField(max_length=64)
    day = fields.DateField()
    request_count = fields.IntField(default=0)
    total_tokens = fields.BigIntField(default=0)

    class Meta:
        table = "key_daily_usage"
        unique_together = (("key_id", "operation", "day"),)


class Reservation(Model):
    """One admitted request still in flight, and the process that owns it.

    Settled exactly once: deleted with its count kept (success) or given back
    (failure). Rows of a process that died (SIGKILL, power loss) are given
    back by a sweep: at startup for dead processes on this host, and for any
    host once ``expires_at`` (past the request timeout) has passed.
    """

    id = fields.BigIntField(primary_key=True)
    operation = fields.CharField(max_length=64)
    key_id = fields.CharField(max_length=16)
    day = fields.DateField()
    host = fields.CharField(max_length=255)
    pid = fields.IntField()
    process_started = fields.FloatField()
    expires_at = fields.DatetimeField(db_index=True)

    class Meta:
        table = "reservation"
        indexes = (("host", "pid"),)


class AuditRecord(Model):
    """One row per API request: who (key id, never the key), what, outcome, cost."""

    id = fields.BigIntField(primary_key=True)
    timestamp = fields.DatetimeField(db_index=True)
    request_id = fields.CharField(max_length=128, null=True)
    method = fields.CharField(max_length=8)
    path = fields.CharField(max_length=256)
    operation = fields.CharField(max_length=64, null=True)
    key_id = fields.CharField(max_length=16, null=True)
    status = fields.SmallIntField()
    duration_ms = fields.FloatField()
    output_tokens = fields.IntField(default=0)

    class Meta:
        table = "audit_record"
