"""The limit day's time zone, reservations of dead processes, and per-key quotas with rate-limit headers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.errors import ConfigurationError, LimitExceededError
from ai_platform.limits.service import LimitService, Owner
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from ai_platform.usage.database import Database
from ai_platform.usage.models import DailyUsage, KeyDailyUsage
from ai_platform.usage.models import Reservation as ReservationRow
from support import ADMIN, KEY, SEED_MODELS, SUMMARIZE, TRANSLATE

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _service(clock: Clock, url: str = "sqlite://:memory:", *, zone: str = "UTC", limit: int = 2) -> LimitService:
    from ai_platform_summarize import OPERATION

    database = Database(url)
    return LimitService(
        database, {"summarize": OPERATION}, default_daily_limit=limit, timezone=ZoneInfo(zone), clock=clock
    )


async def test_the_day_follows_the_configured_time_zone(database_url: str) -> None:
    clock = Clock(datetime(2026, 1, 1, 22, 59, 30, tzinfo=UTC))  # 23:59:30 in Berlin
    service = _service(clock, database_url, zone="Europe/Berlin")
    async with service.database.opened():
        reservation = await service.admit("summarize", "k1")
        await service.commit(reservation, tokens=3)
        assert reservation.rate_limit.reset_seconds == 30
        [today] = await service.usage()
        assert (today.date.isoformat(), today.request_count, today.remaining) == ("2026-01-01", 1, 1)

        clock.now = datetime(2026, 1, 1, 23, 0, 0, tzinfo=UTC)  # Berlin midnight, still Jan 1st in UTC
        [tomorrow] = await service.usage()
        assert (tomorrow.date.isoformat(), tomorrow.request_count, tomorrow.remaining) == ("2026-01-02", 0, 2)
        assert service.seconds_until_reset() == 24 * 3600


def test_reset_counts_real_seconds_across_a_dst_change() -> None:
    # New York springs forward on 2026-03-08: that day has 23 hours.
    clock = Clock(datetime(2026, 3, 8, 5, 0, tzinfo=UTC))  # 00:00 EST
    assert _service(clock, zone="America/New_York").seconds_until_reset() == 23 * 3600


def test_an_unknown_time_zone_stops_startup(env: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError, match="LIMIT_TIMEZONE"):
        Settings.from_mapping({**env, "LIMIT_TIMEZONE": "Mars/Olympus"})


async def _orphan(service: LimitService, clock: Clock, *, host: str, pid: int, expires_in: float) -> None:
    """What a process killed mid-request leaves behind: a counted reservation."""
    reservation = await service.admit("summarize", "k1")
    await ReservationRow.filter(id=reservation.id).update(
        host=host, pid=pid, expires_at=clock.now + timedelta(seconds=expires_in)
    )


async def test_reservations_of_dead_processes_are_given_back(database_url: str) -> None:
    clock = Clock(datetime(2026, 5, 1, 12, tzinfo=UTC))
    service = _service(clock, database_url, limit=2)
    async with service.database.opened():
        me = Owner.current()
        await _orphan(service, clock, host=me.host, pid=2**22 + 7, expires_in=300)  # dead pid on this host
        await _orphan(service, clock, host="other-server", pid=1234, expires_in=300)  # another host: lease
        with pytest.raises(LimitExceededError):
            await service.admit("summarize", "k1")

        assert await service.recover() == 1  # at startup: the dead local process's place comes back
        await service.admit("summarize", "k1")
        with pytest.raises(LimitExceededError):
            await service.admit("summarize", "k1")  # the other host's request may still be running

        clock.now += timedelta(seconds=301)  # its lease ended: that server died
        held = await service.admit("summarize", "k1")
        assert await ReservationRow.all().count() == 2  # the two live ones
        await service.release(held)
        assert await DailyUsage.all().values_list("request_count", flat=True) == [1]
        assert await KeyDailyUsage.all().values_list("request_count", flat=True) == [1]


async def test_a_request_swept_while_still_running_is_still_counted_once(database_url: str) -> None:
    clock = Clock(datetime(2026, 5, 1, 12, tzinfo=UTC))
    service = _service(clock, database_url, limit=5)
    async with service.database.opened():
        reservation = await service.admit("summarize", "k1")
        clock.now += timedelta(hours=1)
        assert await service.sweep_expired() == 1
        await service.commit(reservation, tokens=4)  # it did succeed: counted again, once
        [usage] = await service.usage()
        assert (usage.request_count, usage.total_tokens) == (1, 4)


async def test_per_key_quotas_and_rate_limit_headers(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS))
    async with AsyncTestClient(create_app(Settings.from_mapping(env), engine=engine)) as client:
        me = (await client.get("/usage/keys/me", headers=KEY)).json()["usage"]
        key_id = me[0]["key_id"]
        assert {u["daily_limit"] for u in me} == {None}

        r = await client.put(
            "/quotas", headers=ADMIN, json={"key_id": key_id, "operation": "summarize", "daily_limit": 2}
        )
        assert r.json() == {"key_id": key_id, "operation": "summarize", "daily_limit": 2}
        assert (await client.get("/quotas", headers=ADMIN)).json() == {"quotas": [r.json()]}

        first = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        assert (first.headers["X-RateLimit-Limit"], first.headers["X-RateLimit-Remaining"]) == ("2", "1")
        assert 0 < int(first.headers["X-RateLimit-Reset"]) <= 86400
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
        refused = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        assert refused.status_code == 429
        assert refused.json() == {
            "detail": "Daily quota exceeded for this API key on operation 'summarize': 2/2 requests used today."
        }
        assert refused.headers["Retry-After"] == refused.headers["X-RateLimit-Reset"]
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        # The refusal gave the operation's place back too (one transaction, rolled back).
        ops = {u["operation"]: u for u in (await client.get("/limits/usage", headers=KEY)).json()["usage"]}
        assert ops["summarize"]["request_count"] == 2

        # The operation's own limit is the tighter one elsewhere.
        other = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert (other.headers["X-RateLimit-Limit"], other.headers["X-RateLimit-Remaining"]) == ("1000", "999")

        usage = {
            u["operation"]: u for u in (await client.get(f"/usage/keys?key_id={key_id}", headers=ADMIN)).json()["usage"]
        }
        assert (usage["summarize"]["request_count"], usage["summarize"]["remaining"]) == (2, 0)
        assert (usage["translate"]["request_count"], usage["translate"]["daily_limit"]) == (1, None)

        assert (await client.delete(f"/quotas/{key_id}/summarize", headers=ADMIN)).status_code == 204
        assert (await client.delete(f"/quotas/{key_id}/summarize", headers=ADMIN)).status_code == 404
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"key_id": "0123456789abcdef", "operation": "summarize", "daily_limit": 1}, "key_id"),  # no such key
        ({"key_id": "KEY", "operation": "summarize", "daily_limit": 1}, "key_id"),
        ({"key_id": "0123abcd", "operation": "nope", "daily_limit": 1}, "operation"),
        ({"key_id": "0123abcd", "operation": "summarize", "daily_limit": -1}, "daily_limit"),
    ],
)
async def test_quota_updates_are_validated(env: dict[str, str], body: dict[str, object], field: str) -> None:
    async with AsyncTestClient(create_app(Settings.from_mapping(env), engine=FakeEngine())) as client:
        if body["key_id"] == "0123abcd":  # a real key id, so that only ``field`` is wrong
            body["key_id"] = (await client.get("/usage/keys/me", headers=KEY)).json()["usage"][0]["key_id"]
        r = await client.put("/quotas", headers=ADMIN, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", field]
