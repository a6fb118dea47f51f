"""``GET /metrics``: the series the issue lists, after a few requests, and who may read them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from ai_platform.app import create_app
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from support import ADMIN, KEY, SEED_MODELS, SUMMARIZE

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(models=dict(SEED_MODELS), unavailable={"classify"})


@pytest.fixture
async def client(env: dict[str, str], engine: FakeEngine) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
    async with AsyncTestClient(create_app(Settings.from_mapping(env), engine=engine)) as client:
        yield client


async def test_metrics_expose_requests_latency_tokens_rejections_queue_and_models(
    client: AsyncTestClient,  # type: ignore[type-arg]
) -> None:
    await client.put("/limits", json={"operation": "summarize", "daily_limit": 2}, headers=ADMIN)
    statuses = [(await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert (await client.post("/operations/summarize", json=SUMMARIZE)).status_code == 403
    assert (
        await client.post("/operations/classify", json={"text": "x", "categories": ["a", "b"]}, headers=KEY)
    ).status_code == 503

    r = await client.get("/metrics", headers=ADMIN)
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    found = samples(r.text)
    route = {"operation": "summarize", "route": "/operations/summarize"}
    assert value(found, "ai_platform_requests_total", **route, method="POST", status="200") == 2
    assert value(found, "ai_platform_requests_total", **route, method="POST", status="429") == 1
    # Refused by the authentication middleware: still counted, with its real status.
    assert value(found, "ai_platform_requests_total", **route, method="POST", status="403") == 1
    assert value(found, "ai_platform_requests_total", operation="", route="/limits", method="PUT", status="200") == 1
    assert value(found, "ai_platform_request_duration_seconds_count", **route, status="200") == 2
    assert value(found, "ai_platform_request_duration_seconds_bucket", **route, status="200", le="+Inf") == 2
    assert value(found, "ai_platform_request_duration_seconds_bucket", **route, status="200", le="300.0") == 2
    tokens = [(await client.get("/limits/usage", headers=KEY)).json()["usage"]]
    served = next(u for u in tokens[0] if u["operation"] == "summarize")["total_tokens"]
    assert served > 0
    assert value(found, "ai_platform_generated_tokens_total", operation="summarize") == served
    assert value(found, "ai_platform_generated_tokens_total", operation="translate") == 0
    assert value(found, "ai_platform_limit_rejections_total", operation="summarize") == 1
    assert value(found, "ai_platform_limit_rejections_total", operation="classify") == 0
    for operation, model in SEED_MODELS.items():
        assert value(found, "ai_platform_model_loaded", operation=operation, model=model) == (operation != "classify")
        assert value(found, "ai_platform_queue_depth", operation=operation, model=model) == 0
    assert value(found, "ai_platform_requests_total", operation="classify", route="/operations/classify",
                 method="POST", status="503") == 1  # fmt: skip
    assert any(name == "process_resident_memory_bytes" for name, _ in found)


async def test_metrics_read_queue_depth_from_the_engine_status(
    client: AsyncTestClient,
    engine: FakeEngine,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[type-arg]
) -> None:
    real_status = engine.status

    def with_queue() -> list[object]:
        statuses = real_status()
        for s in statuses:
            object.__setattr__(s, "queue_depth", 3 if s.operation == "translate" else 0)
        return statuses

    monkeypatch.setattr(engine, "status", with_queue)
    found = samples((await client.get("/metrics", headers=ADMIN)).text)
    assert value(found, "ai_platform_queue_depth", operation="translate", model="qwen-translate") == 3


async def test_metrics_need_an_admin_key_by_default(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    assert (await client.get("/metrics")).status_code == 403
    assert (await client.get("/metrics", headers=KEY)).status_code == 403
    assert (await client.get("/metrics", headers=ADMIN)).status_code == 200
    schema = (await client.get("/schema/openapi.json", headers=KEY)).json()
    assert "/metrics" in schema["paths"]


async def test_loopback_access_needs_no_key_but_refuses_remote_clients(env: dict[str, str], engine: FakeEngine) -> None:
    """The allowed case (a real 127.0.0.1 client, directly and through nginx) is in test_deploy_nginx.py."""
    app = create_app(Settings.from_mapping({**env, "METRICS_ACCESS": "loopback"}), engine=engine)
    async with AsyncTestClient(app) as client:
        # The test client's address is "testclient": not a loopback address.
        r = await client.get("/metrics")
        assert r.status_code == 403 and r.json() == {"detail": "Metrics are only served to clients on this host."}
        assert (await client.get("/metrics", headers=ADMIN)).status_code == 403  # a key does not widen loopback
