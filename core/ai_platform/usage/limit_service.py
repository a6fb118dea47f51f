"""Daily limits and usage accounting.

Admission is one conditional ``UPDATE … SET request_count = request_count + 1
WHERE request_count < limit``: the check and the increment are a single
atomic statement in SQLite and PostgreSQL, so concurrent requests can never
push usage past the limit. A request that fails after admission releases its
reservation; one that succeeds adds its tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime

from tortoise.expressions import F

from ai_platform.errors import LimitExceededError
from ai_platform.operations import Operation
from ai_platform.usage.models import DailyUsage, OperationLimit


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class LimitInfo:
    operation: str
    daily_limit: int
    max_input_chars: int
    max_output_tokens: int


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
class Reservation:
    """One admitted request; settled exactly once with ``commit`` or ``release``."""

    operation: str
    day: date


class LimitService:
    def __init__(
        self,
        operations: Mapping[str, Operation],  # type: ignore[type-arg]
        *,
        default_daily_limit: int,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._operations = operations
        self._default_daily_limit = default_daily_limit
        self._clock = clock

    def today(self) -> date:
        return self._clock().astimezone(UTC).date()

    def _default_for(self, operation: str) -> int:
        return self._operations[operation].limits.daily_limit or self._default_daily_limit

    async def _daily_limits(self) -> dict[str, int]:
        overrides = dict(await OperationLimit.all().values_list("operation", "daily_limit"))
        return {name: overrides.get(name, self._default_for(name)) for name in self._operations}

    async def daily_limit(self, operation: str) -> int:
        override = await OperationLimit.get_or_none(operation=operation)
        return override.daily_limit if override is not None else self._default_for(operation)

    async def limits(self) -> list[LimitInfo]:
        daily = await self._daily_limits()
        return [self._info(name, daily[name]) for name in self._operations]

    def _info(self, name: str, daily_limit: int) -> LimitInfo:
        limits = self._operations[name].limits
        return LimitInfo(name, daily_limit, limits.max_input_chars, limits.max_output_tokens)

    async def set_daily_limit(self, operation: str, daily_limit: int) -> LimitInfo:
        await OperationLimit.update_or_create(defaults={"daily_limit": daily_limit}, operation=operation)
        return self._info(operation, daily_limit)

    async def admit(self, operation: str) -> Reservation:
        """Reserve one request of today's allowance or raise :class:`LimitExceededError`."""
        day = self.today()
        limit = await self.daily_limit(operation)
        if not await self._increment_below(operation, day, limit):
            # First request of the day: create the row (another request may race us to it).
            await DailyUsage.bulk_create([DailyUsage(operation=operation, day=day)], ignore_conflicts=True)
            if not await self._increment_below(operation, day, limit):
                used = await DailyUsage.get(operation=operation, day=day).values_list("request_count", flat=True)
                raise LimitExceededError(
                    f"Daily limit exceeded for operation '{operation}': {used}/{limit} requests used today."
                )
        return Reservation(operation, day)

    @staticmethod
    async def _increment_below(operation: str, day: date, limit: int) -> bool:
        updated = await DailyUsage.filter(operation=operation, day=day, request_count__lt=limit).update(
            request_count=F("request_count") + 1
        )
        return bool(updated)

    async def commit(self, reservation: Reservation, *, tokens: int) -> None:
        """The request succeeded: keep its count and add its tokens."""
        if tokens:
            await DailyUsage.filter(operation=reservation.operation, day=reservation.day).update(
                total_tokens=F("total_tokens") + tokens
            )

    async def release(self, reservation: Reservation) -> None:
        """The request failed: give its reservation back."""
        await DailyUsage.filter(operation=reservation.operation, day=reservation.day).update(
            request_count=F("request_count") - 1
        )

    async def usage(self) -> list[UsageInfo]:
        """Today's usage for every operation (zeros where nothing ran yet)."""
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
