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


EMAIL, PHONE = "jane@example.com", "+44 20 7946 0958"
TEXT = f"Contact {EMAIL} or {PHONE} about the invoice."


def assert_masked(text: str) -> None:
    """No trace of the e-mail address or the phone number; both masks in their place."""
    assert EMAIL not in text and "jane" not in text and "example.com" not in text, text
    assert "7946" not in text and "0958" not in text, text
    assert "[email]" in text and "[phone]" in text, text


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_masks_model_input_and_response(platform_client, anyio_backend: str) -> None:  # type: ignore[no-untyped-def]
    import ai_platform_summarize

    engine = FakeEngine()
    async with platform_client(
        ("summarize", ai_platform_summarize), ("redact", ai_platform_redact), engine=engine
    ) as client:
        r = await client.post("/operations/summarize", json={"text": TEXT}, headers=CLIENT_HEADERS)
        assert r.status_code == 200, r.text
    [(_, call)] = engine.calls  # what reached the model
    for message in call.messages:
        assert EMAIL not in message.content and "7946" not in message.content
    assert_masked(call.messages[-1].content)
    assert_masked(r.json()["summary"])  # the fake model echoes its input: the response is masked too


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_masks_the_input_of_a_choice_but_not_its_options(platform_client, anyio_backend: str) -> None:  # type: ignore[no-untyped-def]
    import ai_platform_classify

    engine = FakeEngine()
    body = {"text": TEXT, "categories": ["billing", "sales"]}
    async with platform_client(
        ("classify", ai_platform_classify), ("redact", ai_platform_redact), engine=engine
    ) as client:
        r = await client.post("/operations/classify", json=body, headers=CLIENT_HEADERS)
        assert r.status_code == 200, r.text
    [(_, call)] = engine.calls
    assert_masked(call.messages[-1].content)
    assert list(call.options) == ["billing", "sales"]
    assert r.json()["label"] in {"billing", "sales"}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_without_the_plugin_the_text_reaches_the_model_as_is(platform_client, anyio_backend: str) -> None:  # type: ignore[no-untyped-def]
    """The control: the checks above see the model's input (they would fail if nothing masked it)."""
    import ai_platform_summarize

    engine = FakeEngine()
    async with platform_client(("summarize", ai_platform_summarize), engine=engine) as client:
        r = await client.post("/operations/summarize", json={"text": TEXT}, headers=CLIENT_HEADERS)
        assert r.status_code == 200, r.text
    [(_, call)] = engine.calls
    assert EMAIL in call.messages[-1].content and PHONE in call.messages[-1].content
