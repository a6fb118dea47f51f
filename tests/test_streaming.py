"""Operations as Server-Sent Events (issue 13, item 1), over a real server.

Asked for with ``"stream": true`` in the body or ``Accept: text/event-stream`` (a ``stream`` in
the body decides). Refusals come before the stream as plain JSON; the stream carries text deltas
(operations whose text is not post-processed, without plugins wrapping the response), then one
``result`` event with exactly the non-streaming body, or one ``error`` event. Counted once, when
the result is produced; an abandoned stream is not counted.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from ai_platform.app import create_app
from ai_platform.errors import ModelUnavailableError
from ai_platform.plugins import load_plugins
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from support import ADMIN, KEY, SEED_MODELS, SUMMARIZE, TRANSLATE
from test_disconnect import live_server, reservations

pytestmark = pytest.mark.anyio

STREAM = {**KEY, "Accept": "text/event-stream"}


async def events(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str] = STREAM
) -> tuple[httpx.Response, list[tuple[str, Any]]]:
    """The response and its (event, data) pairs."""
    received: list[tuple[str, Any]] = []
    async with client.stream("POST", path, json=body, headers=headers) as response:
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                received.append((event or "message", json.loads(line.removeprefix("data:").strip())))
    return response, received


async def counts(client: httpx.AsyncClient) -> dict[str, int]:
    usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
    return {u["operation"]: u["request_count"] for u in usage}


def without_timing(body: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in body["meta"].items() if k not in ("execution_time_ms", "timestamp")}
    return {**body, "meta": meta}


async def test_a_translation_streams_deltas_then_the_same_body_and_is_counted_once(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), delay=0.01)
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        response, received = await events(client, "/operations/translate", TRANSLATE)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["X-RateLimit-Remaining"] == "999"
        *deltas, (last, body) = received
        assert last == "result" and len(deltas) >= 3 and {name for name, _ in deltas} == {"delta"}
        assert "".join(data["text"] for _, data in deltas) == body["translated_text"]
        plain = (await client.post("/operations/translate", json=TRANSLATE, headers=KEY)).json()
        assert without_timing(body) == without_timing(plain)
        assert (await counts(client))["translate"] == 2


async def test_post_processed_text_streams_only_the_final_event(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS))
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        # summarize cuts the model's text to max_sentences: a delta could show what the answer drops.
        _, received = await events(client, "/operations/summarize", SUMMARIZE)
        assert [name for name, _ in received] == ["result"]
        assert received[0][1]["summary"].count(".") == SUMMARIZE["max_sentences"]


async def test_a_plugin_wrapping_responses_turns_deltas_off(env: dict[str, str]) -> None:
    plugins = load_plugins(enabled=["translate", "redact"])
    assert plugins.wraps_responses()
    engine = FakeEngine(models=dict(SEED_MODELS))
    app = create_app(
        Settings.from_mapping({**env, "ENABLED_PLUGINS": "translate,redact"}), plugins=plugins, engine=engine
    )
    body = {**TRANSLATE, "text": "Write to jane.doe@example.com today."}
    async with live_server(app) as (_, client):
        _, received = await events(client, "/operations/translate", body)
        assert [name for name, _ in received] == ["result"]
        assert "jane.doe@example.com" not in json.dumps(received)


async def test_refusals_come_before_the_stream_as_plain_json(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), unavailable={"summarize"})
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        r = await client.post("/operations/translate", json={**TRANSLATE, "text": ""}, headers=STREAM)
        assert r.status_code == 422 and r.json()["error"] == "Request validation failed."
        r = await client.post("/operations/translate", json=TRANSLATE, headers={"Accept": "text/event-stream"})
        assert r.status_code == 403
        r = await client.post("/operations/summarize", json=SUMMARIZE, headers=STREAM)
        assert r.status_code == 503 and "Retry-After" in r.headers
        put = {"operation": "translate", "daily_limit": 0}
        assert (await client.put("/limits", json=put, headers=ADMIN)).status_code == 200
        r = await client.post("/operations/translate", json=TRANSLATE, headers=STREAM)
        assert r.status_code == 429 and r.json()["detail"].startswith("Daily limit exceeded")
        assert engine.calls == []


async def test_an_error_after_the_start_is_the_last_event_and_not_counted(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), fail_with=ModelUnavailableError("Model 'x' stopped unexpectedly."))
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        response, received = await events(client, "/operations/translate", TRANSLATE)
        assert response.status_code == 200
        assert received == [("error", {"status": 503, "detail": "Model 'x' stopped unexpectedly."})]
        assert (await counts(client))["translate"] == 0
        assert reservations(env) == 0


async def test_an_abandoned_stream_is_not_counted(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), delay=0.2)
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        async with client.stream("POST", "/operations/translate", json=TRANSLATE, headers=STREAM) as response:
            async for line in response.aiter_lines():
                if line.startswith("event: delta"):
                    break  # hang up after the first delta
        for _ in range(100):
            if reservations(env) == 0:
                break
            await asyncio.sleep(0.05)
        assert reservations(env) == 0
        assert (await counts(client))["translate"] == 0


async def test_stream_true_in_the_body_streams_without_the_accept_header(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), delay=0.01)
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        response, received = await events(client, "/operations/translate", {**TRANSLATE, "stream": True}, KEY)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        *deltas, (last, body) = received
        assert last == "result" and len(deltas) >= 3 and {name for name, _ in deltas} == {"delta"}
        assert "".join(data["text"] for _, data in deltas) == body["translated_text"]
        plain = (await client.post("/operations/translate", json=TRANSLATE, headers=KEY)).json()
        assert without_timing(body) == without_timing(plain)
        assert (await counts(client))["translate"] == 2


async def test_stream_false_answers_json_even_when_accept_asks_for_events(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS))
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        plain = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        for headers in (KEY, STREAM):
            r = await client.post("/operations/translate", json={**TRANSLATE, "stream": False}, headers=headers)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            assert without_timing(r.json()) == without_timing(plain.json())
            assert r.headers["X-RateLimit-Limit"] == "1000"


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None, [], {}])
async def test_a_stream_that_is_not_a_boolean_is_a_422_in_the_seed_format(env: dict[str, str], value: Any) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS))
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (_, client):
        r = await client.post("/operations/summarize", json={**SUMMARIZE, "stream": value}, headers=STREAM)
        assert r.status_code == 422 and r.headers["content-type"] == "application/json"
        assert r.json() == {
            "error": "Request validation failed.",
            "detail": [{"type": "bool_type", "loc": ["body", "stream"], "msg": "Input should be a valid boolean",
                        "input": value}],
        }  # fmt: skip
        assert engine.calls == [] and (await counts(client))["summarize"] == 0


async def test_the_operation_gets_its_own_request_type(env: dict[str, str]) -> None:
    """``stream`` is the platform's: plugins and the operation see their request type, never the field."""
    import types

    from ai_platform import hookimpl

    seen: list[type] = []

    @hookimpl(wrapper=True)
    def build_model_call(operation: object, request: Any) -> Any:
        seen.append(type(request))
        return (yield)

    spy = types.ModuleType("spy")
    spy.build_model_call = build_model_call  # type: ignore[attr-defined]
    plugins = load_plugins(enabled=["summarize", "spy"], extra_plugins=[("spy", spy)])
    app = create_app(Settings.from_mapping({**env, "ENABLED_PLUGINS": "summarize,spy"}), plugins=plugins,
                     engine=FakeEngine(models=dict(SEED_MODELS)))  # fmt: skip
    async with live_server(app) as (_, client):
        _, received = await events(client, "/operations/summarize", {**SUMMARIZE, "stream": True}, KEY)
        assert [name for name, _ in received] == ["result"]
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
    from ai_platform_summarize import OPERATION

    assert seen == [OPERATION.request_type, OPERATION.request_type]


def test_an_operation_may_not_define_stream() -> None:
    import dataclasses

    import msgspec

    from ai_platform_summarize import OPERATION

    class WithStream(msgspec.Struct, kw_only=True):
        text: str
        stream: str = "no"

    class Renamed(msgspec.Struct, kw_only=True, rename={"flow": "stream"}):
        text: str
        flow: bool = False

    for request_type in (WithStream, Renamed):
        with pytest.raises(ValueError, match="request_type may not have a field 'stream'"):
            dataclasses.replace(OPERATION, request_type=request_type).validate()
