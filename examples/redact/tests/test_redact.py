"""The redaction plugin's own tests."""

from __future__ import annotations

import ai_platform_redact
import pytest
from ai_platform_redact import redact

from ai_platform.testing import CLIENT_HEADERS, FakeEngine


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mail jane.doe+x@example.co.uk now", "Mail [email] now"),
        ("Call +1 (555) 123-4567 or 020 7946 0958.", "Call [phone] or [phone]."),
        ("Order 12345 shipped in 2024, v1.2.3", "Order 12345 shipped in 2024, v1.2.3"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_masks_model_input_and_response(platform_client, anyio_backend: str) -> None:  # type: ignore[no-untyped-def]
    import ai_platform_summarize

    engine = FakeEngine()
    text = "Contact jane@example.com or +44 20 7946 0958 about the invoice."
    async with platform_client(
        ("summarize", ai_platform_summarize), ("redact", ai_platform_redact), engine=engine
    ) as client:
        r = await client.post("/operations/summarize", json={"text": text}, headers=CLIENT_HEADERS)
        assert r.status_code == 200, r.text
    [(_, call)] = engine.calls
    prompt = " ".join(m.content for m in call.messages)
    assert "jane@example.com" not in prompt and "7946" not in prompt and "[email]" in prompt
    summary = r.json()["summary"]  # the fake model echoes its input: the response is masked too
    assert "jane@example.com" not in summary and "[email]" in summary
