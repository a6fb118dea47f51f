"""The limit service: daily limits, per-key quotas and usage accounting, over the usage database.

Admission is one transaction of conditional updates, ``UPDATE … SET
request_count = request_count + 1 WHERE request_count < limit``, first on the
operation's row, then on the caller's key row, then a :class:`Reservation`
row naming the process that owns the request. Each conditional update is
atomic in SQLite (one writer at a time) and in PostgreSQL (row lock, the
condition re-checked on the latest row), so no number of concurrent
requests, workers or servers can push usage past a limit; a refused key
quota rolls back the operation's increment too.

A reservation is settled exactly once: whoever deletes its row (the request's
commit or release, or the sweep of a dead process) adjusts the counters. So a
request is counted iff it succeeded, even when its worker was killed.

Cancellation (a client that hangs up, a timeout, a shutdown) never splits these
steps: each transaction runs to its end in a task of its own, whatever happens
to the request that asked for it, and an admission whose caller was cancelled
meanwhile gives back what it took before the cancellation goes on (issue 11).
Without that, a cancelled caller stopped waiting while its transaction committed
on the database's thread anyway, and the place stayed taken until the lease ran
out; and a queued release or commit that a second cancellation dropped was lost.

A refusal (429) tells the truth at the moment of the check: how many requests
were counted today (succeeded) and how many are in progress (admitted, not
settled): "22/24 requests used today, 2 in progress." The in-progress ones take
places until they settle, so either may end up counted or given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any, TypeVar

import psutil

from ai_platform.errors import DatabaseUnavailableError, LimitExceededError
from ai_platform.limits import statements
from ai_platform.operations import Operation
from ai_platform.usage.database import Database, translate_errors
from ai_platform.usage.models import DailyUsage, KeyDailyUsage, KeyQuota, OperationLimit
from ai_platform.usage.models import Reservation as ReservationRow

log = logging.getLogger(__name__)

T = TypeVar("T")
# What an admin's PUT replaces in an existing limit or quota row.
UPSERTED = ("daily_limit", "updated_at")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class LimitInfo:
    operation: str
    daily_limit: int
    max_input_chars: int
    max_output_tokens: int | None  # None: the operation only chooses (``operations.Limits``)
    max_input_tokens: int | None


@dataclass(frozen=True)
class UsageInfo:
    operation: str
    date: date
    request_count: int
    total_tokens: int
    daily_limit: int

    @property
    def remaining(self) -> int:
        return max(self.daily_limit - self.request_count, 0)


@dataclass(frozen=True)
class KeyUsageInfo:
    key_id: str
    operation: str
    date: date
    request_count: int
    total_tokens: int
    daily_limit: int | None  # the key's quota; None: only the operation's limit applies

    @property
    def remaining(self) -> int | None:
        return None if self.daily_limit is None else max(self.daily_limit - self.request_count, 0)


@dataclass(frozen=True)
class QuotaInfo:
    key_id: str
    operation: str
    daily_limit: int


@dataclass(frozen=True)
class RateLimit:
    """The tightest limit that applies to a caller, as ``X-RateLimit-*`` headers."""

    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_seconds),
        }


@dataclass(frozen=True)
class Reservation:
    """One admitted request; settled exactly once with ``commit`` or ``release``."""

    id: int
    operation: str
    key_id: str
    day: date
    rate_limit: RateLimit


@dataclass(frozen=True)
class Owner:
    """The process holding reservations: a restarted process (or a reused pid) is a different owner."""

    host: str
    pid: int
    started: float

    @classmethod
    def current(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time())

    def is_alive(self) -> bool:
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) < 0.01
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True


class LimitService:
    """Everything routes and the orchestrator ask of limits and usage; they never reach the database themselves."""

    def __init__(
        self,
        database: Database,
        operations: Mapping[str, Operation],
        *,
        default_daily_limit: int,
        timezone: tzinfo = UTC,
        lease_seconds: float = 360.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """``lease_seconds`` must exceed the longest a request can run (its timeout) plus clock skew between servers."""
        self._database = database
        self._operations = operations
        self._default_daily_limit = default_daily_limit
        self._timezone = timezone
        self._lease = timedelta(seconds=lease_seconds)
        self._clock = clock
        self._owner: Owner | None = None
        # Admissions and settlements in flight, each in a task of its own (see ``_detached``).
        self._settling: set[asyncio.Task[Any]] = set()

    @property
    def database(self) -> Database:
        """The usage database it counts in (``translate_errors`` guards its calls)."""
        return self._database

    # -- the limit day -----------------------------------------------------------------

    def today(self) -> date:
        """The limit day: the date in ``LIMIT_TIMEZONE`` now."""
        return self._clock().astimezone(self._timezone).date()

    def seconds_until_reset(self) -> int:
        """Seconds until the next midnight in ``LIMIT_TIMEZONE`` (DST-aware), at least 1."""
        now = self._clock()
        midnight = datetime.combine(self.today() + timedelta(days=1), time(0), tzinfo=self._timezone)
        # Subtract in UTC: aware datetimes sharing a tzinfo subtract as wall-clock times.
        return max(math.ceil((midnight.astimezone(UTC) - now.astimezone(UTC)).total_seconds()), 1)

    # -- operation limits --------------------------------------------------------------

    @property
    def operations(self) -> list[str]:
        """The names of the operations this service counts."""
        return list(self._operations)

    def _default_for(self, operation: str) -> int:
        return self._operations[operation].limits.daily_limit or self._default_daily_limit

    async def _daily_limits(self) -> dict[str, int]:
        overrides = dict(await OperationLimit.all().values_list("operation", "daily_limit"))
        return {name: overrides.get(name, self._default_for(name)) for name in self._operations}

    @translate_errors
    async def limits(self) -> list[LimitInfo]:
        daily = await self._daily_limits()
        return [self._info(name, daily[name]) for name in self._operations]

    def _info(self, name: str, daily_limit: int) -> LimitInfo:
        limits = self._operations[name].limits
        return LimitInfo(name, daily_limit, limits.max_input_chars, limits.max_output_tokens, limits.max_input_tokens)

    @translate_errors
    async def set_daily_limit(self, operation: str, daily_limit: int) -> LimitInfo:
        # One INSERT ... ON CONFLICT DO UPDATE: a write from its first step. update_or_create reads
        # first, and on SQLite (WAL) a transaction that read before another connection's commit
        # cannot write: under request traffic half of such writes failed at once as "locked" (503).
        limit = OperationLimit(operation=operation, daily_limit=daily_limit)
        await OperationLimit.bulk_create([limit], on_conflict=["operation"], update_fields=UPSERTED)
        return self._info(operation, daily_limit)

    # -- per-key quotas ----------------------------------------------------------------

    @translate_errors
    async def quotas(self) -> list[QuotaInfo]:
        rows = await KeyQuota.all().order_by("key_id", "operation")
        return [QuotaInfo(r.key_id, r.operation, r.daily_limit) for r in rows]

    @translate_errors
    async def set_quota(self, key_id: str, operation: str, daily_limit: int) -> QuotaInfo:
        quota = KeyQuota(key_id=key_id, operation=operation, daily_limit=daily_limit)
        await KeyQuota.bulk_create([quota], on_conflict=["key_id", "operation"], update_fields=UPSERTED)  # as above
        return QuotaInfo(key_id, operation, daily_limit)

    @translate_errors
    async def delete_quota(self, key_id: str, operation: str) -> bool:
        return bool(await KeyQuota.filter(key_id=key_id, operation=operation).delete())

    @translate_errors
    async def key_usage(self, key_ids: list[str]) -> list[KeyUsageInfo]:
        """Today's usage of each key on each operation (zeros where nothing ran yet)."""
        await self.sweep_expired()
        day = self.today()
        rows = {
            (r.key_id, r.operation): r
            for r in await KeyDailyUsage.filter(day=day, key_id__in=key_ids, operation__in=list(self._operations))
        }
        quotas = {
            (q.key_id, q.operation): q.daily_limit
            for q in await KeyQuota.filter(key_id__in=key_ids, operation__in=list(self._operations))
        }
        return [
            KeyUsageInfo(
                key_id=key,
                operation=name,
                date=day,
                request_count=rows[key, name].request_count if (key, name) in rows else 0,
                total_tokens=rows[key, name].total_tokens if (key, name) in rows else 0,
                daily_limit=quotas.get((key, name)),
            )
            for key in key_ids
            for name in self._operations
        ]

    # -- admission and settlement ------------------------------------------------------

    async def admit(self, operation: str, key_id: str) -> Reservation:
        """Reserve one request of today's allowance or raise :class:`LimitExceededError`.

        Safe to cancel at any moment: if the caller is cancelled while the admission
        waits for the database, runs there, or has just committed, what it took is
        given back before the cancellation reaches the caller (and, cancelled again
        meanwhile, still given back, by the admission's own task).
        """
        admitting = self._detached(self._admit(operation, key_id))
        try:
            return await asyncio.shield(admitting)
        except asyncio.CancelledError:
            await self._outlive(self._detached(self._give_back_if_admitted(admitting)))
            raise

    async def _give_back_if_admitted(self, admitting: asyncio.Task[Reservation]) -> None:
        try:
            reservation = await admitting
        except BaseException:
            return  # refused or failed: it took nothing
        await self._release(reservation)

    @translate_errors
    async def _admit(self, operation: str, key_id: str) -> Reservation:
        try:
            return await self._reserve(operation, key_id)
        except LimitExceededError:
            # Places held by crashed processes come back once their lease ends.
            if not await self.sweep_expired():
                raise
            return await self._reserve(operation, key_id)

    async def _reserve(self, operation: str, key_id: str) -> Reservation:
        day = self.today()
        owner = self._owner or Owner.current()
        owner_row = (owner.host, owner.pid, owner.started)
        admission = statements.admission(
            operation, key_id, day, self._default_for(operation), owner_row, self._clock() + self._lease
        )
        result = await self._database.transactions().run(admission)
        if isinstance(result, statements.Refused):
            if result.key_quota:
                detail = f"Daily quota exceeded for this API key on operation '{operation}': "
            else:
                detail = f"Daily limit exceeded for operation '{operation}': "
            detail += f"{result.done}/{result.limit} requests used today"
            if result.in_progress:
                detail += f", {result.in_progress} in progress"
            raise self._exceeded(f"{detail}.", result.limit)
        taken, key_taken = result.operation, result.key
        assert taken.limit is not None  # the operation's limit always has a value
        candidates = [(taken.limit, taken.limit - taken.used)]
        if key_taken.limit is not None:
            candidates.append((key_taken.limit, key_taken.limit - key_taken.used))
        tightest, remaining = min(candidates, key=lambda c: c[1])
        rate = RateLimit(tightest, remaining, self.seconds_until_reset())
        return Reservation(result.reservation_id, operation, key_id, day, rate)

    def _exceeded(self, detail: str, limit: int) -> LimitExceededError:
        rate = RateLimit(limit, 0, self.seconds_until_reset())
        return LimitExceededError(detail, headers={**rate.headers(), "Retry-After": str(rate.reset_seconds)})

    async def commit(self, reservation: Reservation, *, tokens: int) -> None:
        """The request succeeded: keep its count and add its tokens.

        Once called it runs to its end even if the caller is cancelled meanwhile: the
        request is then counted although its client is gone (the window README.md
        documents), never half-settled or dropped from the database thread's queue.
        """
        await self._to_the_end(self._commit(reservation, tokens))

    @translate_errors
    async def _commit(self, reservation: Reservation, tokens: int) -> None:
        r = reservation
        if not await self._database.transactions().run(
            statements.settlement(r.id, r.operation, r.key_id, r.day, tokens=tokens)
        ):
            log.warning("reservation %d was swept before it committed; counted it again", r.id)

    async def release(self, reservation: Reservation) -> None:
        """The request failed: give its reservation back.

        Never raises but the caller's own cancellation (the request's own error matters);
        runs to its end even if the caller is cancelled meanwhile. A release after the
        reservation was settled (committed, released or swept) changes nothing.
        """
        await self._to_the_end(self._release(reservation))

    async def _release(self, reservation: Reservation) -> None:
        try:
            await self._give_back(reservation.id, reservation.operation, reservation.key_id, reservation.day)
        except DatabaseUnavailableError:
            log.warning("could not release reservation %d now; the sweep will", reservation.id)
        except Exception:
            log.exception("could not release reservation %d; the sweep will", reservation.id)

    # -- work that the caller's cancellation must not cut short ------------------------

    def _detached(self, work: Awaitable[T]) -> asyncio.Task[T]:
        """``work`` in a task of its own, kept referenced until it ends."""
        task = asyncio.ensure_future(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _to_the_end(self, work: Awaitable[T]) -> T:
        """Await ``work``, which a cancellation of the caller does not stop: the caller waits for it, then is cancelled."""
        task = self._detached(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await self._outlive(task)
            raise

    @staticmethod
    async def _outlive(task: asyncio.Task[Any]) -> None:
        """During a cancellation: wait for ``task`` to end; cancelled again, leave it to end alone."""
        with contextlib.suppress(BaseException):
            await asyncio.shield(task)

    @translate_errors
    async def _give_back(self, row_id: int, operation: str, key_id: str, day: date) -> bool:
        return await self._database.transactions().run(
            statements.settlement(row_id, operation, key_id, day, tokens=None)
        )

    # -- crash recovery ----------------------------------------------------------------

    @translate_errors
    async def recover(self) -> int:
        """At startup: become the owner of new reservations; give back those of dead processes on this host."""
        self._owner = Owner.current()
        rows = await ReservationRow.filter(host=self._owner.host).distinct().values_list("pid", "process_started")
        dead = [Owner(self._owner.host, pid, started) for pid, started in rows]
        dead = [o for o in dead if o != self._owner and not o.is_alive()]
        released = 0
        for owner in dead:
            for row in await ReservationRow.filter(host=owner.host, pid=owner.pid, process_started=owner.started):
                released += await self._give_back(row.id, row.operation, row.key_id, row.day)
        if released:
            log.warning("gave back %d reservations of %d dead worker process(es)", released, len(dead))
        return released

    @translate_errors
    async def sweep_expired(self) -> int:
        """Give back reservations whose lease ended (their process died, on any host)."""
        released = 0
        for row in await ReservationRow.filter(expires_at__lt=self._clock()):
            released += await self._give_back(row.id, row.operation, row.key_id, row.day)
        if released:
            log.warning("gave back %d expired reservations", released)
        return released

    @translate_errors
    async def usage(self) -> list[UsageInfo]:
        """Today's usage for every operation (zeros where nothing ran yet)."""
        await self.sweep_expired()
        day = self.today()
        rows = {r.operation: r for r in await DailyUsage.filter(day=day, operation__in=list(self._operations))}
        daily = await self._daily_limits()
        return [
            UsageInfo(
                operation=name,
                date=day,
                request_count=rows[name].request_count if name in rows else 0,
                total_tokens=rows[name].total_tokens if name in rows else 0,
                daily_limit=daily[name],
            )
            for name in self._operations
        ]
