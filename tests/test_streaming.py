"""Operations as Server-Sent Events (issue 13, item 1), over a real server.

Asked for with ``"stream": true`` in the body or ``Accept: text/event-stream`` (a ``stream`` in
the body decides). Refusals come before the stream as plain JSON; the stream carries text deltas
(operations whose text is not post-processed, without plugins wrapping the response), then one
``result`` event with exactly the non-streaming body, or one ``error`` event. Counted once, when
the result is produced; an abandoned stream is not counted. The audit trail and /metrics record
how a stream ended (200 once its result is produced, its error event's status, 499 when its client
hung up), not the 200 its response started with.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from ai_platform.app import create_app
from ai_platform.errors import ModelUnavailableError
from ai_platform.plugins import load_plugins
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine, platform_env
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


# -- how a stream ended, in the audit trail and /metrics ---------------------------------------


async def audited(env: dict[str, str], path: str, rows: int = 1, seconds: float = 10) -> list[int]:
    """The audit trail's statuses for ``path``, once it holds ``rows`` of them (written in batches)."""
    async with asyncio.timeout(seconds):
        while True:
            connection = sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite://"))
            try:
                query = "SELECT status FROM audit_record WHERE path = ? ORDER BY id"
                statuses = [int(row[0]) for row in connection.execute(query, (path,))]
            finally:
                connection.close()
            if len(statuses) >= rows:
                return statuses
            await asyncio.sleep(0.05)


async def requests_by_status(client: httpx.AsyncClient, route: str) -> dict[str, float]:
    """``ai_platform_requests_total`` of ``route``, by status."""
    found: dict[str, float] = {}
    for line in (await client.get("/metrics", headers=ADMIN)).text.splitlines():
        if line.startswith("ai_platform_requests_total{") and f'route="{route}"' in line:
            status = re.search(r'status="(\d+)"', line)
            assert status is not None
            found[status[1]] = found.get(status[1], 0) + float(line.rsplit(" ", 1)[1])
    return found


async def hang_up_after(client: httpx.AsyncClient, path: str, body: dict[str, Any], prefix: str, count: int) -> None:
    """Stream ``path`` and hang up after the ``count``-th line starting with ``prefix``."""
    async with client.stream("POST", path, json=body, headers=STREAM) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith(prefix):
                count -= 1
                if count == 0:
                    break


async def test_streams_are_audited_with_how_they_ended(env: dict[str, str]) -> None:
    """200 for a delivered result, the error event's status, 499 for an abandoned stream: never 200 for those."""
    route = "/operations/translate"
    failing = FakeEngine(models=dict(SEED_MODELS), fail_with=ModelUnavailableError("Model 'x' stopped unexpectedly."))
    async with live_server(create_app(Settings.from_mapping(env), engine=failing)) as (_, client):
        _, received = await events(client, route, TRANSLATE)
        assert [name for name, _ in received] == ["error"]
        assert await audited(env, route) == [503]
        assert await requests_by_status(client, route) == {"503": 1}
    slow = FakeEngine(models=dict(SEED_MODELS), delay=0.2)
    async with live_server(create_app(Settings.from_mapping(env), engine=slow)) as (_, client):
        await hang_up_after(client, route, TRANSLATE, "event: delta", 1)
        assert await audited(env, route, rows=2) == [503, 499]
        assert await requests_by_status(client, route) == {"499": 1}
        assert reservations(env) == 0 and (await counts(client))["translate"] == 0
        slow.delay = 0
        _, received = await events(client, route, TRANSLATE)
        assert received[-1][0] == "result"
        assert await audited(env, route, rows=3) == [503, 499, 200]
        assert await requests_by_status(client, route) == {"499": 1, "200": 1}


CHAT_STREAM = {"model": "fake-chat", "messages": [{"role": "user", "content": "Say hello to the team"}], "stream": True}


async def data_lines(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[str]:
    """The ``data:`` of each event of a whole stream (OpenAI's end with ``[DONE]``, which is not JSON)."""
    async with client.stream("POST", path, json=body, headers=STREAM) as response:
        assert response.status_code == 200
        return [line.removeprefix("data:").strip() async for line in response.aiter_lines() if line.startswith("data:")]


async def test_openai_streams_are_audited_with_how_they_ended(tmp_path: Path) -> None:
    env = platform_env(tmp_path, ENABLED_PLUGINS="chat", OPENAI_API="true")
    route = "/v1/chat/completions"
    failing = FakeEngine(fail_with=ModelUnavailableError("Model 'x' stopped unexpectedly."))
    async with live_server(create_app(Settings.from_mapping(env), engine=failing)) as (_, client):
        data = await data_lines(client, route, CHAT_STREAM)
        assert json.loads(data[-1])["error"]["code"] == "service_unavailable"
        assert await audited(env, route) == [503]
        assert await requests_by_status(client, route) == {"503": 1}
    slow = FakeEngine(delay=0.2)
    async with live_server(create_app(Settings.from_mapping(env), engine=slow)) as (_, client):
        await hang_up_after(client, route, CHAT_STREAM, "data:", 2)  # the role, then the first words
        assert await audited(env, route, rows=2) == [503, 499]
        assert await requests_by_status(client, route) == {"499": 1}
        assert reservations(env) == 0
        slow.delay = 0
        assert (await data_lines(client, route, CHAT_STREAM))[-1] == "[DONE]"
        assert await audited(env, route, rows=3) == [503, 499, 200]


async def test_a_timeout_after_the_start_is_a_504_error_event_and_not_counted(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), delay=0.2)  # a word each 0.2 s: about 2.6 s in all
    settings = Settings.from_mapping({**env, "REQUEST_TIMEOUT_SECONDS": "1"})
    async with live_server(create_app(settings, engine=engine)) as (_, client):
        response, received = await events(client, "/operations/translate", TRANSLATE)
        assert response.status_code == 200
        *deltas, last = received
        assert deltas and {name for name, _ in deltas} == {"delta"}  # the stream had started
        assert last == ("error", {"status": 504, "detail": "Request timed out after 1 seconds."})
        assert (await counts(client))["translate"] == 0
        assert reservations(env) == 0
        assert await audited(env, "/operations/translate") == [504]


async def test_a_client_gone_before_the_first_event_gives_its_place_back_at_once(env: dict[str, str]) -> None:
    """The client hangs up once the 200 has started, before the stream's first event.

    Litestar then cancels the response before it ever iterates the stream (its first step even
    runs in a thread), so no generator body runs: its place must still be given back at once,
    not when its lease ends, and the request is audited as abandoned (499), not served.
    """
    app = create_app(Settings.from_mapping(env), engine=FakeEngine(models=dict(SEED_MODELS)))
    async with live_server(app) as (_, client):  # started (database, limits); the test speaks ASGI to it
        started = asyncio.Event()
        sent: list[dict[str, Any]] = []
        body = json.dumps(TRANSLATE).encode()
        requested = False

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            await started.wait()  # already set when Litestar listens for it: it cancels the stream at once
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.start":
                started.set()

        headers = {**STREAM, "Content-Type": "application/json", "Content-Length": str(len(body)), "Host": "test"}
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/operations/translate", "raw_path": b"/operations/translate", "root_path": "",
            "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80), "state": {},
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }  # fmt: skip
        await app(scope, receive, send)  # type: ignore[arg-type]
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
        assert b"event:" not in b"".join(m.get("body", b"") for m in sent)  # no event went out
        assert reservations(env) == 0  # given back with the response, not by the lease sweep
        assert (await counts(client))["translate"] == 0
        assert await audited(env, "/operations/translate") == [499]
