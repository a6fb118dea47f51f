"""The third-party examples, installed from examples/ with pip, work like built-ins."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.operations import Choice, Choose
from ai_platform.plugins import ENTRY_POINT_GROUP
from ai_platform.settings import Settings
from support import ADMIN, KEY

pytestmark = pytest.mark.anyio


def test_examples_are_installed_distributions() -> None:
    found = {ep.name: ep.dist.name if ep.dist else None for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert found["sentiment"] == "ai-platform-sentiment"
    assert found["redact"] == "ai-platform-redact"


async def test_sentiment_end_to_end_on_the_tiny_model(
    env: dict[str, str], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ai_platform.runtime.engine import InferenceEngine

    reached: list[tuple[str, Choose]] = []  # what the engine was asked (the model's input)
    choose = InferenceEngine.choose

    async def recording_choose(self: InferenceEngine, operation: str, call: Choose) -> Choice:
        reached.append((operation, call))
        return await choose(self, operation, call)

    monkeypatch.setattr(InferenceEngine, "choose", recording_choose)
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
        text = "Mail me at jane.doe@b.org or call +1 (555) 123-4567, I love it!"
        r = await client.post("/operations/sentiment", json={"text": text}, headers=KEY)
        assert r.status_code == 200, r.text
        [(operation, call)] = reached
        assert operation == "sentiment"
        prompt = "\n".join(m.content for m in call.messages)
        # The redact plugin masked the text before it reached the model.
        assert "jane.doe@b.org" not in prompt and "b.org" not in prompt and "555" not in prompt and "4567" not in prompt
        assert "Mail me at [email] or call [phone], I love it!" in prompt
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
