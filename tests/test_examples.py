"""The third-party examples, installed from examples/ with pip, work like built-ins."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.plugins import ENTRY_POINT_GROUP
from ai_platform.settings import Settings
from support import ADMIN, KEY

pytestmark = pytest.mark.anyio


def test_examples_are_installed_distributions() -> None:
    found = {ep.name: ep.dist.name if ep.dist else None for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert found["sentiment"] == "ai-platform-sentiment"
    assert found["redact"] == "ai-platform-redact"


async def test_sentiment_end_to_end_on_the_tiny_model(env: dict[str, str], tiny_model_dir: Path) -> None:
    settings = Settings.from_mapping(
        {
            **env,
            "ENABLED_PLUGINS": "summarize,sentiment,redact",
            "MODELS_DIR": str(tiny_model_dir.parent),
            "DEFAULT_MODEL": tiny_model_dir.name,
            "OPERATION_MODEL_MAP": "{}",
        }
    )
    async with AsyncTestClient(create_app(settings)) as client:
        r = await client.post("/operations/sentiment", json={"text": "Mail me at a@b.org, I love it!"}, headers=KEY)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["sentiment"] in {"positive", "negative", "neutral"}
        assert sum(body["scores"].values()) == pytest.approx(1.0)
        assert body["meta"]["model_used"] == tiny_model_dir.name
        assert (
            await client.put("/limits", json={"operation": "sentiment", "daily_limit": 1}, headers=ADMIN)
        ).status_code == 200
        r = await client.post("/operations/sentiment", json={"text": "again"}, headers=KEY)
        assert r.status_code == 429
        usage = {
            u["operation"]: u["request_count"] for u in (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        }
        assert usage["sentiment"] == 1
        plugins = {p["name"]: p for p in (await client.get("/plugins", headers=ADMIN)).json()["plugins"]}
        assert plugins["redact"]["hooks"] == ["build_model_call", "build_response"]


async def test_disabling_the_example_removes_its_route(env: dict[str, str]) -> None:
    settings = Settings.from_mapping({**env, "ENABLED_PLUGINS": "summarize,sentiment", "DISABLED_PLUGINS": "sentiment"})
    from ai_platform.testing import FakeEngine

    async with AsyncTestClient(create_app(settings, engine=FakeEngine())) as client:
        r = await client.post("/operations/sentiment", json={"text": "hi"}, headers=KEY)
        assert r.status_code == 404
        assert "sentiment" not in {
            o["name"] for o in (await client.get("/operations", headers=KEY)).json()["operations"]
        }
