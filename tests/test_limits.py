"""Limit admission under concurrency, and exactly-once counting."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.errors import LimitExceededError
from ai_platform.limits.service import LimitService
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from ai_platform.usage.audit import AuditEntry, AuditTrail
from ai_platform.usage.database import Database
from ai_platform.usage.models import AuditRecord
from support import ADMIN, ADMIN_KEY, CLIENT_KEY, KEY, SEED_MODELS, SUMMARIZE
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
        # Each refusal says how many were used and how many were in progress then: 10 in all.
        for rejected in (r for r in responses if r.status_code == 429):
            detail = rejected.json()["detail"]
            match = re.fullmatch(
                r"Daily limit exceeded for operation 'summarize': (\d+)/10 requests used today(?:, (\d+) in progress)?\.",
                detail,
            )
            assert match is not None, detail
            assert int(match[1]) + int(match[2] or 0) == 10, detail
        usage = (await client.get("/limits/usage", headers={"X-API-Key": CLIENT_KEY})).json()["usage"]
        summarize = next(u for u in usage if u["operation"] == "summarize")
        assert (summarize["request_count"], summarize["remaining"]) == (10, 0)
        assert summarize["total_tokens"] == sum(
            r.json()["meta"]["output_tokens"] for r in responses if r.status_code == 200
        )
        assert len(engine.calls) == 10  # refused requests never reached the model
        assert engine.most > 1, "the requests never overlapped: the test proves nothing about concurrency"


# -- requests that cannot run take no place (issue 11 #2) ------------------------------------

# Within summarize's 8000 characters, but over the fake model's context window (1000 characters).
OVER_LONG = {**SUMMARIZE, "text": "Too long for the model. " * 80}
ZEROS = {"summarize": 0, "translate": 0, "classify": 0}


async def counts(client: Any) -> dict[str, int]:
    usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
    return {u["operation"]: u["request_count"] for u in usage}


async def test_over_long_requests_take_no_place(env: dict[str, str]) -> None:
    """With 5 places left, 10 over-long and 10 valid concurrent requests: the 10 over-long are 422
    without taking a place (the model's context window is checked before admission), 5 valid run."""
    engine = FakeEngine(models=dict(SEED_MODELS), delay=0.2, max_prompt_chars=1000)
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        r = await client.put("/limits", json={"operation": "summarize", "daily_limit": 5}, headers=ADMIN)
        assert r.status_code == 200
        responses = await asyncio.gather(
            *(client.post("/operations/summarize", json=OVER_LONG, headers=KEY) for _ in range(10)),
            *(client.post("/operations/summarize", json=SUMMARIZE, headers=KEY) for _ in range(10)),
        )
        over_long, valid = responses[:10], responses[10:]
        assert [r.status_code for r in over_long] == [422] * 10
        [entry] = over_long[0].json()["detail"]
        assert (entry["type"], entry["loc"]) == ("string_too_long", ["body", "text"])
        assert entry["msg"].startswith("Input is too long for the model's context window")
        assert sorted(r.status_code for r in valid) == [200] * 5 + [429] * 5
        assert await counts(client) == {**ZEROS, "summarize": 5}
        assert reservations(env) == 0
        assert len(engine.calls) == 5  # only the admitted valid ones reached the model


async def test_an_unloaded_model_is_refused_before_admission(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    admitted: list[str] = []
    admit = LimitService.admit

    async def counting_admit(self: LimitService, operation: str, key_id: str) -> Any:
        admitted.append(operation)
        return await admit(self, operation, key_id)

    monkeypatch.setattr(LimitService, "admit", counting_admit)
    engine = FakeEngine(models=dict(SEED_MODELS), unavailable={"summarize"}, max_prompt_chars=1000)
    async with AsyncTestClient(create_app(Settings.from_mapping(env), engine=engine)) as client:
        r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        assert r.status_code == 503 and "not loaded" in r.json()["detail"]
        text = OVER_LONG["text"]
        for operation, body in (
            ("translate", {"text": text, "source_language": "en", "target_language": "fr"}),
            ("classify", {"text": text, "categories": ["a", "b"]}),
        ):
            r = await client.post(f"/operations/{operation}", json=body, headers=KEY)
            assert r.status_code == 422 and "context window" in r.json()["detail"][0]["msg"]
        assert admitted == []
        assert engine.calls == []
        assert await counts(client) == ZEROS


async def test_engines_that_cannot_count_are_still_served(env: dict[str, str]) -> None:
    """``Engine.check`` may return ``None`` (it cannot count the prompt's tokens): the request is
    served, no token limit applies, and a prompt that does not fit is refused by the model itself,
    after admission, with the same 422 naming the request's field, and given its place back."""

    class CannotCount(FakeEngine):
        async def check(self, operation: str, call: Any) -> int | None:
            self.checks.append((operation, call))
            return None

    engine = CannotCount(models=dict(SEED_MODELS), max_prompt_chars=1000)
    async with AsyncTestClient(create_app(Settings.from_mapping(env), engine=engine)) as client:
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
        r = await client.post("/operations/summarize", json=OVER_LONG, headers=KEY)
        assert r.status_code == 422
        [entry] = r.json()["detail"]
        assert (entry["type"], entry["loc"]) == ("string_too_long", ["body", "text"])
        assert entry["msg"].startswith("Input is too long for the model's context window")
        assert len(engine.checks) == 2 and len(engine.calls) == 2  # both reached the model
        assert await counts(client) == {**ZEROS, "summarize": 1}
        assert reservations(env) == 0


class FailsOnRequest(FakeEngine):
    """A FakeEngine whose calls fail (a 500) when the prompt contains ``FAIL``."""

    async def generate(self, operation: str, call: Any, *, max_output_tokens: int) -> Any:
        completion = await super().generate(operation, call, max_output_tokens=max_output_tokens)
        if "FAIL" in call.messages[-1].content:
            raise RuntimeError("failed on purpose")
        return completion


async def test_a_429_tells_requests_used_from_those_in_progress(env: dict[str, str]) -> None:
    """A 429's numbers are true: used (committed) today, and in progress (admitted, not settled)."""
    engine = FailsOnRequest(models=dict(SEED_MODELS), delay=1.5)  # long enough to ask while they run
    failing = {**SUMMARIZE, "text": "This one will FAIL."}
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        await client.put("/limits", json={"operation": "summarize", "daily_limit": 3}, headers=ADMIN)
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
        succeeding = asyncio.ensure_future(client.post("/operations/summarize", json=SUMMARIZE, headers=KEY))
        failed = asyncio.ensure_future(client.post("/operations/summarize", json=failing, headers=KEY))
        async with asyncio.timeout(10):
            while len(engine.calls) < 3:
                await asyncio.sleep(0.005)
        r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        assert r.status_code == 429
        assert r.json() == {
            "detail": "Daily limit exceeded for operation 'summarize': 1/3 requests used today, 2 in progress."
        }
        assert r.headers["X-RateLimit-Remaining"] == "0"
        assert [(await succeeding).status_code, (await failed).status_code] == [200, 500]
        assert (await counts(client))["summarize"] == 2  # the failed one gave its place back
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
        r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        assert r.json() == {"detail": "Daily limit exceeded for operation 'summarize': 3/3 requests used today."}


async def test_a_key_quota_429_tells_requests_used_from_those_in_progress(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), delay=1.5)
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        key_id = (await client.get("/usage/keys/me", headers=KEY)).json()["usage"][0]["key_id"]
        quota = {"key_id": key_id, "operation": "summarize", "daily_limit": 1}
        assert (await client.put("/quotas", json=quota, headers=ADMIN)).status_code == 200
        running = asyncio.ensure_future(client.post("/operations/summarize", json=SUMMARIZE, headers=KEY))
        async with asyncio.timeout(10):
            while not engine.calls:
                await asyncio.sleep(0.005)
        r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        assert r.status_code == 429
        assert r.json() == {
            "detail": "Daily quota exceeded for this API key on operation 'summarize': "
            "0/1 requests used today, 1 in progress."
        }
        assert (await running).status_code == 200
        r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        assert r.json() == {
            "detail": "Daily quota exceeded for this API key on operation 'summarize': 1/1 requests used today."
        }


class _Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 23, 59, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_reservations_settle_exactly_once_and_days_reset(tmp_path: object) -> None:
    from ai_platform_summarize import OPERATION

    clock = _Clock()
    db = Database(f"sqlite://{tmp_path}/limits.sqlite3")
    service = LimitService(db, {"summarize": OPERATION}, default_daily_limit=2, clock=clock)
    async with db.opened():
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


async def test_admin_writes_succeed_while_requests_are_counted(tmp_path: Path) -> None:
    """PUT /limits and /quotas while requests are admitted and counted on the same SQLite file.

    Before: update_or_create read, then wrote; on SQLite (WAL) a transaction that read before
    another connection's commit cannot write, and 291 of 600 such writes failed at once as
    "database is locked" (a 503 to the admin). Now each is one upsert statement.
    """
    from ai_platform.usage.models import KeyQuota, OperationLimit
    from ai_platform_summarize import OPERATION

    db = Database(f"sqlite://{tmp_path}/limits.sqlite3")
    service = LimitService(db, {"summarize": OPERATION}, default_daily_limit=10**9)
    done = asyncio.Event()

    async def traffic(key: str) -> int:
        served = 0
        while not done.is_set():
            await service.commit(await service.admit("summarize", key), tokens=3)
            served += 1
        return served

    async with db.opened():
        clients = [asyncio.create_task(traffic(f"k{n}")) for n in range(4)]
        try:
            first = await service.set_daily_limit("summarize", 10**9)
            created = (await OperationLimit.get(operation="summarize")).updated_at
            for step in range(1, 101):
                await service.set_daily_limit("summarize", 10**9 + step)
                await service.set_quota("k1", "summarize", 10**9 + step)
        finally:
            done.set()
            served = sum(await asyncio.gather(*clients))
        assert first.daily_limit == 10**9 and served > 0
        row = await OperationLimit.get(operation="summarize")
        assert row.daily_limit == 10**9 + 100 and row.updated_at > created  # replaced in place, time moved
        assert [(q.key_id, q.daily_limit) for q in await KeyQuota.all()] == [("k1", 10**9 + 100)]
        [usage] = await service.usage()
        assert usage.request_count == served


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
    db = Database(f"sqlite://{tmp_path}/audit.sqlite3")
    trail = AuditTrail(db, flush_seconds=60, max_pending=100)
    entry = AuditEntry(datetime.now(UTC), "r", "POST", "/operations/summarize", "summarize", "k", 200, 1.5, 3)
    async with db.opened():
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
    db = Database(f"sqlite://{tmp_path}/audit.sqlite3")
    async with db.opened():
        for request_id, age in (("old", timedelta(days=91)), ("recent", timedelta(days=89))):
            await AuditRecord.create(
                timestamp=now - age, request_id=request_id, method="GET", path="/health", status=200, duration_ms=1
            )
        trail = AuditTrail(db, retention_days=retention_days)
        trail.record(AuditEntry(now, "new", "GET", "/health", None, None, 200, 1.0, 0))
        await trail.flush()
        assert set(await AuditRecord.all().values_list("request_id", flat=True)) == kept
