"""The sentiment plugin's own tests, using the platform's test kit (ai_platform.testing)."""

from __future__ import annotations

import ai_platform_sentiment
import pytest

from ai_platform.evaluation.examples import check_examples
from ai_platform.testing import CLIENT_HEADERS, check_operation

pytestmark = pytest.mark.parametrize("anyio_backend", ["asyncio"])


def test_spec_and_pipeline(anyio_backend: str) -> None:
    response = check_operation(ai_platform_sentiment.build_operation(), {"text": "I love it."})
    assert response.sentiment in ai_platform_sentiment.DEFAULT_LABELS
    assert sum(response.scores.values()) == pytest.approx(1.0)


def test_labels_come_from_config(anyio_backend: str) -> None:
    [operation] = ai_platform_sentiment.register_operations(config={"labels": ["good", "bad"]})
    assert check_operation(operation, {"text": "good"}).scores.keys() == {"good", "bad"}
    with pytest.raises(ValueError, match="at least two unique"):
        ai_platform_sentiment.build_operation(("good", "good"))


def test_examples_match_the_schemas(anyio_backend: str) -> None:
    examples = check_examples(ai_platform_sentiment.build_operation())
    assert len(examples) == len(ai_platform_sentiment.EXAMPLES) == 12
    assert {e.expected["sentiment"] for e in examples} == set(ai_platform_sentiment.DEFAULT_LABELS)
    assert any(e.split == "heldout" for e in examples)


def test_examples_follow_the_configured_labels(anyio_backend: str) -> None:
    [operation] = ai_platform_sentiment.register_operations(config={"labels": ["positive", "negative"]})
    assert {e.expected["sentiment"] for e in check_examples(operation)} == {"positive", "negative"}


@pytest.mark.anyio
async def test_served_limited_and_counted(platform_client, anyio_backend: str) -> None:  # type: ignore[no-untyped-def]
    async with platform_client(("sentiment", ai_platform_sentiment)) as client:
        r = await client.post(
            "/operations/sentiment", json={"text": "What a great, positive day!"}, headers=CLIENT_HEADERS
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["sentiment"] == "positive"  # the fake engine favours labels that occur in the text
        assert body["confidence"] == body["scores"]["positive"]
        r = await client.post("/operations/sentiment", json={"text": "x" * 2001}, headers=CLIENT_HEADERS)
        assert r.status_code == 422
        [usage] = (await client.get("/limits/usage", headers=CLIENT_HEADERS)).json()["usage"]
        assert (usage["operation"], usage["request_count"]) == ("sentiment", 1)
