"""Limit admission under concurrency, and exactly-once counting."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.errors import LimitExceededError
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from ai_platform.usage.audit import AuditEntry, AuditTrail
from ai_platform.usage.database import database
from ai_platform.usage.limit_service import LimitService
from ai_platform.usage.models import AuditRecord
from support import ADMIN_KEY, CLIENT_KEY, KEY, SEED_MODELS, SUMMARIZE
from test_disconnect import SlowForward, live_server, queue_depth, reservations, tiny_seed_env, until_depth

pytestmark = pytest.mark.anyio


class OverlapCounting(FakeEngine):
    """A FakeEngine that records how many of its calls ran at the same time, at most."""

    running: int = 0
    most: int = 0

    async def generate(self, operation: str, call: Any, *, max_output_tokens: int) -> Any:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            return await super().generate(operation, call, max_output_tokens=max_output_tokens)
        finally:
            self.running -= 1


async def test_concurrent_requests_never_exceed_the_limit(env: dict[str, str]) -> None:
    engine = OverlapCounting(models=dict(SEED_MODELS), delay=0.05)  # requests overlap inside the model call
    # A real server: Litestar's AsyncTestClient would run the 50 requests one after another.
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        r = await client.put(
            "/limits", json={"operation": "summarize", "daily_limit": 10}, headers={"X-API-Key": ADMIN_KEY}
        )
        assert r.status_code == 200
        responses = await asyncio.gather(
            *(
                client.post("/operations/summarize", json=SUMMARIZE, headers={"X-API-Key": CLIENT_KEY})
                for _ in range(50)
            )
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 10 + [429] * 40
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.json() == {
            "detail": "Daily limit exceeded for operation 'summarize': 10/10 requests used today."
        }
        usage = (await client.get("/limits/usage", headers={"X-API-Key": CLIENT_KEY})).json()["usage"]
        summarize = next(u for u in usage if u["operation"] == "summarize")
        assert (summarize["request_count"], summarize["remaining"]) == (10, 0)
        assert summarize["total_tokens"] == sum(
            r.json()["meta"]["output_tokens"] for r in responses if r.status_code == 200
        )
        assert len(engine.calls) == 10  # refused requests never reached the model
        assert engine.most > 1, "the requests never overlapped: the test proves nothing about concurrency"


class _Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 23, 59, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_reservations_settle_exactly_once_and_days_reset(tmp_path: object) -> None:
    from ai_platform_summarize import OPERATION

    clock = _Clock()
    service = LimitService({"summarize": OPERATION}, default_daily_limit=2, clock=clock)
    async with database(f"sqlite://{tmp_path}/limits.sqlite3"):
        first = await service.admit("summarize", "k1")
        second = await service.admit("summarize", "k1")
        with pytest.raises(LimitExceededError):
            await service.admit("summarize", "k1")
        await service.release(second)  # a failed request gives its place back
        third = await service.admit("summarize", "k1")
        await service.commit(first, tokens=5)
        await service.commit(third, tokens=7)
        [today] = await service.usage()
        assert (today.request_count, today.total_tokens, today.remaining) == (2, 12, 0)

        clock.now = datetime(2026, 1, 2, 0, 0, 1, tzinfo=UTC)  # midnight UTC: a new allowance
        [tomorrow] = await service.usage()
        assert (tomorrow.request_count, tomorrow.remaining) == (0, 2)
        await service.admit("summarize", "k1")


async def test_timeout_is_504_and_not_counted(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), delay=5)
    settings = Settings.from_mapping({**env, "REQUEST_TIMEOUT_SECONDS": "0.2"})
    async with AsyncTestClient(create_app(settings, engine=engine)) as client:
        r = await client.post("/operations/summarize", json=SUMMARIZE, headers={"X-API-Key": CLIENT_KEY})
        assert r.status_code == 504
        assert r.json() == {"detail": "Request timed out after 0.2 seconds."}
        assert engine.cancelled == 1  # the model work was stopped, not left running
        usage = (await client.get("/limits/usage", headers={"X-API-Key": CLIENT_KEY})).json()["usage"]
        assert all(u["request_count"] == 0 for u in usage)


async def test_full_queue_is_503_with_retry_after_and_not_counted(
    env: dict[str, str], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's real queue fills: one sequence decodes (the batch holds one), one waits, the next is refused."""
    forward = SlowForward(monkeypatch, delay=0.01)  # 512 new tokens take over 5 s
    overrides = {"MAX_QUEUE_PER_MODEL": "1", "MAX_BATCH_PER_MODEL": "1"}
    settings = Settings.from_mapping(tiny_seed_env(env, tiny_model_dir, **overrides))
    other = {**SUMMARIZE, "text": "A second text, about the weather in spring."}
    async with live_server(create_app(settings)) as (_, client):
        decoding = asyncio.ensure_future(client.post("/operations/summarize", json=SUMMARIZE, headers=KEY))
        await until_depth(client, "summarize", 1)
        waiting = asyncio.ensure_future(client.post("/operations/summarize", json=other, headers=KEY))
        await until_depth(client, "summarize", 2)  # one in the batch, one in the queue: it is full
        r = await client.post("/operations/summarize", json={**SUMMARIZE, "text": "A third one."}, headers=KEY)
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
        assert r.json() == {"detail": "Model 'qwen-summarize' is busy: 1 requests are already waiting."}
        assert await queue_depth(client, "summarize") == 2  # the refused request took no place
        forward.delay = 0
        assert [(await decoding).status_code, (await waiting).status_code] == [200, 200]
        usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        assert {u["operation"]: u["request_count"] for u in usage} == {"summarize": 2, "translate": 0, "classify": 0}
        assert reservations(env) == 0


def test_sqlite_connection_defaults_and_overrides() -> None:
    from ai_platform.usage.database import connection_url

    assert connection_url("sqlite://data/x.sqlite3") == "sqlite://data/x.sqlite3?busy_timeout=30000&synchronous=NORMAL"
    assert connection_url("sqlite://x.db?synchronous=FULL") == "sqlite://x.db?synchronous=FULL&busy_timeout=30000"
    assert connection_url("postgres://u:p@h/db") == "postgres://u:p@h/db"


async def test_audit_rows_are_written_in_batches_and_flushed(tmp_path: Path) -> None:
    trail = AuditTrail(flush_seconds=60, max_pending=100)
    entry = AuditEntry(datetime.now(UTC), "r", "POST", "/operations/summarize", "summarize", "k", 200, 1.5, 3)
    async with database(f"sqlite://{tmp_path}/audit.sqlite3"):
        for _ in range(100):
            trail.record(entry)  # the 100th starts a write without waiting for the timer
        async with asyncio.timeout(10):
            while await AuditRecord.all().count() < 100:
                await asyncio.sleep(0.01)
        assert await AuditRecord.all().count() == 100
        for _ in range(20):
            trail.record(entry)  # these wait for the timer (60 s)...
        await asyncio.sleep(0.2)  # (a write started now would be done by then)
        assert await AuditRecord.all().count() == 100
        await trail.flush()  # ...or a flush (shutdown)
        assert await AuditRecord.filter(status=200, output_tokens=3).count() == 120


@pytest.mark.parametrize(("retention_days", "kept"), [(90, {"recent", "new"}), (0, {"old", "recent", "new"})])
async def test_audit_rows_past_the_retention_are_deleted(tmp_path: Path, retention_days: int, kept: set[str]) -> None:
    now = datetime.now(UTC)
    async with database(f"sqlite://{tmp_path}/audit.sqlite3"):
        for request_id, age in (("old", timedelta(days=91)), ("recent", timedelta(days=89))):
            await AuditRecord.create(
                timestamp=now - age, request_id=request_id, method="GET", path="/health", status=200, duration_ms=1
            )
        trail = AuditTrail(retention_days=retention_days)
        trail.record(AuditEntry(now, "new", "GET", "/health", None, None, 200, 1.0, 0))
        await trail.flush()
        assert set(await AuditRecord.all().values_list("request_id", flat=True)) == kept
