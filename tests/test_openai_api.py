"""The OpenAI-compatible API (issue 13, item 2), with the official ``openai`` client against a real server.

``/v1/chat/completions`` and ``/v1/models`` exist only with ``OPENAI_API=true``; they serve the
operation ``chat`` through the platform's own orchestration: the same keys (``Authorization:
Bearer`` too), daily limit and quotas, counted once per 200 and never for errors or abandoned
streams, audited as ``chat``; errors in OpenAI's body. End to end on the tiny model (greedy,
seeded sampling, max_tokens, stop, streaming) and on the demo model.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ai_platform import chat
from ai_platform.api.auth import key_id
from ai_platform.app import create_app
from ai_platform.operations import Message
from ai_platform.runtime.model import LanguageModel
from ai_platform.settings import Settings
from ai_platform.testing import ADMIN_KEY, CLIENT_KEY, FakeEngine, platform_env
from runtime_reference import greedy_generate
from support import ADMIN, KEY, ROOT
from test_disconnect import live_server, reservations

pytestmark = pytest.mark.anyio

HELLO = [{"role": "user", "content": "Say hello to the team"}]
BEARER = {"Authorization": f"Bearer {CLIENT_KEY}"}


@pytest.fixture
def chat_env(tmp_path: Path) -> dict[str, str]:
    return platform_env(tmp_path, ENABLED_PLUGINS="chat", OPENAI_API="true")


@asynccontextmanager
async def serving(
    env: dict[str, str], engine: Any = None
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    """A real server for ``env`` and an ``openai`` client of it (no retries: a 429 is an answer here)."""
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (server, client):
        base_url = f"http://127.0.0.1:{server.config.port}/v1"
        async with openai.AsyncOpenAI(base_url=base_url, api_key=CLIENT_KEY, max_retries=0) as oai:
            yield oai, client


async def chat_count(client: httpx.AsyncClient) -> int:
    usage = (await client.get("/limits/usage", headers=BEARER)).json()["usage"]
    return next((u["request_count"] for u in usage if u["operation"] == "chat"), 0)


async def streamed(oai: openai.AsyncOpenAI, **kwargs: Any) -> tuple[str, str | None, Any]:
    """Text, finish reason and usage of a streamed completion."""
    stream = await oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    text, reason, usage = "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason, usage


async def test_disabled_unless_the_admin_enables_it(tmp_path: Path) -> None:
    env = platform_env(tmp_path, ENABLED_PLUGINS="chat")  # the plugin allowed, the API not enabled
    async with serving(env, FakeEngine()) as (oai, client):
        with pytest.raises(openai.NotFoundError):
            await oai.models.list()
        assert (await client.get("/operations", headers=KEY)).json()["operations"] == []


async def test_completion_and_models_through_the_openai_client(chat_env: dict[str, str]) -> None:
    engine = FakeEngine()
    async with serving(chat_env, engine) as (oai, client):
        models = await oai.models.list()
        assert [m.id for m in models.data] == ["fake-chat"]
        assert (await oai.models.retrieve("fake-chat")).owned_by == "ai-platform"
        messages = [{"role": "developer", "content": "Be brief."}, *HELLO]
        completion = await oai.chat.completions.create(model="fake-chat", messages=messages, max_tokens=3)  # type: ignore[arg-type]
        assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
        assert completion.choices[0].message.content == "Say hello to. Second sentence. Third sentence."
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 3
        assert completion.usage.prompt_tokens == len("Be brief.") + len("Say hello to the team")  # the fake's tokens
        _, call = engine.calls[-1]
        assert [m.role for m in call.messages] == ["system", "user"]  # type: ignore[attr-defined]
        assert call.temperature == 1.0 and call.max_output_tokens == 3  # type: ignore[attr-defined]  # OpenAI's default
        assert await chat_count(client) == 1
        # The same operation in the platform's own format, with the same key as a Bearer token.
        plain = await client.post("/operations/chat", json={"messages": HELLO, "temperature": 0}, headers=BEARER)
        assert plain.status_code == 200 and plain.json()["meta"]["operation"] == "chat"
        assert await chat_count(client) == 2
        usage = (await client.get("/usage/keys/me", headers=KEY)).json()
        assert "chat" in str(usage)


async def test_streaming_through_the_openai_client_is_counted_once(chat_env: dict[str, str]) -> None:
    async with serving(chat_env, FakeEngine(delay=0.01)) as (oai, client):
        plain = await oai.chat.completions.create(model="fake-chat", messages=HELLO, temperature=0)  # type: ignore[arg-type]
        text, reason, usage = await streamed(oai, model="fake-chat", messages=HELLO, temperature=0)
        assert text == plain.choices[0].message.content and reason == plain.choices[0].finish_reason
        assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]
        assert await chat_count(client) == 2


async def test_errors_have_openai_bodies_and_are_not_counted(chat_env: dict[str, str]) -> None:
    async with serving(chat_env, FakeEngine()) as (oai, client):
        async with openai.AsyncOpenAI(base_url=str(oai.base_url), api_key="not-a-key", max_retries=0) as bad_key:
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await bad_key.chat.completions.create(model="fake-chat", messages=HELLO)  # type: ignore[arg-type]
        assert denied.value.code == "invalid_api_key"
        cases: list[tuple[type[openai.APIStatusError], dict[str, Any], str | None, str | None]] = [
            (openai.NotFoundError, {"model": "gpt-4o"}, None, "model_not_found"),
            (openai.BadRequestError, {"extra_body": {"tools": []}}, "tools", "extra_forbidden"),
            (openai.BadRequestError, {"top_logprobs": 2}, "top_logprobs", "value_error"),  # needs logprobs: true
            (openai.BadRequestError, {"n": 2}, "n", "less_than_equal"),
            (openai.BadRequestError, {"presence_penalty": 0.5}, "presence_penalty", "value_error"),
            (openai.BadRequestError, {"max_tokens": 5000}, "max_tokens", "less_than_equal"),
            (openai.BadRequestError, {"temperature": 3}, "temperature", "less_than_equal"),
            (openai.BadRequestError, {"messages": []}, "messages", "too_short"),
            (
                openai.BadRequestError,
                {"messages": [{"role": "tool", "content": "x"}]},
                "messages.0.role",
                "value_error",
            ),
            (openai.BadRequestError, {"messages": [{"role": "user", "content": " "}]}, None, "string_too_short"),
        ]
        for error, change, param, code in cases:
            request = {"model": "fake-chat", "messages": HELLO, **change}
            with pytest.raises(error) as raised:
                await oai.chat.completions.create(**request)
            assert (raised.value.param, raised.value.code) == (param, code), change
            assert isinstance(raised.value.body, dict) and raised.value.body["type"] == "invalid_request_error"
        # A request over the context window: OpenAI's code for it.
        with pytest.raises(openai.BadRequestError) as too_long:
            await oai.chat.completions.create(model="fake-chat", messages=[{"role": "user", "content": "x" * 40_000}])
        assert too_long.value.code == "string_too_long" and too_long.value.param is None
        assert await chat_count(client) == 0


async def test_context_window_is_context_length_exceeded(chat_env: dict[str, str]) -> None:
    async with serving(chat_env, FakeEngine(max_prompt_chars=50)) as (oai, client):
        with pytest.raises(openai.BadRequestError) as raised:
            await oai.chat.completions.create(model="fake-chat", messages=[{"role": "user", "content": "x" * 60}])
        assert raised.value.code == "context_length_exceeded"
        assert await chat_count(client) == 0


async def test_the_chat_daily_limit_answers_429(chat_env: dict[str, str]) -> None:
    async with serving(chat_env, FakeEngine()) as (oai, client):
        changed = await client.put("/limits", json={"operation": "chat", "daily_limit": 1}, headers=ADMIN)
        assert changed.status_code == 200
        await oai.chat.completions.create(model="fake-chat", messages=HELLO)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as limited:
            await oai.chat.completions.create(model="fake-chat", messages=HELLO)  # type: ignore[arg-type]
        assert limited.value.code == "rate_limit_exceeded" and "Daily limit exceeded" in limited.value.message
        assert (
            limited.value.response.headers["Retry-After"]
            and limited.value.response.headers["X-RateLimit-Remaining"] == "0"
        )
        assert await chat_count(client) == 1


async def test_a_key_quota_on_chat_answers_429_on_v1(chat_env: dict[str, str]) -> None:
    async with serving(chat_env, FakeEngine()) as (oai, client):
        quota = {"key_id": key_id(CLIENT_KEY, chat_env["SECRET_KEY"]), "operation": "chat", "daily_limit": 1}
        assert (await client.put("/quotas", json=quota, headers=ADMIN)).status_code == 200
        await oai.chat.completions.create(model="fake-chat", messages=HELLO)  # type: ignore[arg-type]
        for stream in (False, True):  # a stream is refused before it starts, with the same 429
            with pytest.raises(openai.RateLimitError) as limited:
                await oai.chat.completions.create(model="fake-chat", messages=HELLO, stream=stream)  # type: ignore[arg-type]
            assert limited.value.code == "rate_limit_exceeded"
            assert limited.value.body == {
                "message": "Daily quota exceeded for this API key on operation 'chat': 1/1 requests used today.",
                "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded",
            }  # fmt: skip
            headers = limited.value.response.headers
            assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("1", "0")
            assert headers["Retry-After"].isdigit()
        # The quota is this key's: another key is still served.
        async with openai.AsyncOpenAI(base_url=str(oai.base_url), api_key=ADMIN_KEY, max_retries=0) as admin:
            await admin.chat.completions.create(model="fake-chat", messages=HELLO)  # type: ignore[arg-type]
        assert await chat_count(client) == 2


def audit_rows(env: dict[str, str]) -> list[tuple[str, str, str | None, int, str | None]]:
    """``(method, path, operation, status, request_id)`` of every audited request, oldest first."""
    connection = sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite://"))
    try:
        query = "SELECT method, path, operation, status, request_id FROM audit_record ORDER BY id"
        return [tuple(row) for row in connection.execute(query)]
    finally:
        connection.close()


async def test_v1_calls_are_audited_as_operation_chat(chat_env: dict[str, str]) -> None:
    async with serving(chat_env, FakeEngine()) as (oai, _):
        completion = await oai.chat.completions.create(model="fake-chat", messages=HELLO)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            await oai.chat.completions.create(model="gpt-4o", messages=HELLO)  # type: ignore[arg-type]
        await oai.models.list()
    rows = audit_rows(chat_env)  # written at the latest when the server stops
    completions = [row for row in rows if row[1] == "/v1/chat/completions"]
    assert completions[0] == ("POST", "/v1/chat/completions", "chat", 200, completion.id)  # its id, as answered
    assert completions[1][2:4] == ("chat", 404)
    assert ("GET", "/v1/models", None, 200, None) in rows  # no operation runs there


async def test_the_readme_openai_snippet_runs(chat_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """README.md's "OpenAI-compatible API" snippet, as written, against a server (only its URL and key filled in)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## OpenAI-compatible API") :]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert snippet is not None and 'base_url="http://127.0.0.1:8000/v1"' in snippet[1]
    async with serving(chat_env, FakeEngine(answer="Red, green and blue.")) as (oai, client):
        code = snippet[1].replace("http://127.0.0.1:8000/v1", str(oai.base_url).rstrip("/"))
        # The snippet uses the synchronous client: it runs in a thread, the server in this event loop.
        await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {"KEY": CLIENT_KEY})
        assert await chat_count(client) == 2
    printed = capsys.readouterr().out
    assert printed.startswith("Red, green and blue. CompletionUsage(") and printed.endswith("Red, green and blue.")


async def test_an_abandoned_stream_is_not_counted(chat_env: dict[str, str]) -> None:
    engine = FakeEngine(delay=0.2)
    async with serving(chat_env, engine) as (oai, client):
        stream = await oai.chat.completions.create(model="fake-chat", messages=HELLO, stream=True)  # type: ignore[arg-type]
        async for chunk in stream:
            if chunk.choices[0].delta.content:
                break  # hang up after the first text
        await stream.close()
        for _ in range(100):
            if reservations(chat_env) == 0:
                break
            await asyncio.sleep(0.05)
        assert reservations(chat_env) == 0
        assert await chat_count(client) == 0


async def test_a_plugin_wrapping_responses_gets_the_whole_text_at_once(tmp_path: Path) -> None:
    # redact masks e-mail addresses in the answer: a delta could show one before it is masked.
    env = platform_env(tmp_path, ENABLED_PLUGINS="chat,redact", OPENAI_API="true")
    engine = FakeEngine(answer="Write to ann@example.com today.", delay=0.01)
    async with serving(env, engine) as (oai, client):
        stream = await oai.chat.completions.create(model="fake-chat", messages=HELLO, stream=True)  # type: ignore[arg-type]
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices[0].delta.content]
        assert pieces == ["Write to [email] today."]
        assert await chat_count(client) == 1


def test_the_chat_limits_come_from_its_plugin_configuration() -> None:
    operation = chat.build_operation({"max_output_tokens": 64, "max_input_chars": 500})
    assert (operation.limits.max_output_tokens, operation.limits.max_input_chars) == (64, 500)
    assert chat.build_operation({}).limits.max_output_tokens == chat.DEFAULT_LIMITS["max_output_tokens"]
    with pytest.raises(ValueError, match=r"unknown setting.*max_output"):
        chat.build_operation({"max_output": 64})
    request = chat.ChatRequest(
        messages=[chat.ChatMessage(role="user", content="hi")], max_completion_tokens=64, stop="\n"
    )
    call = operation.prompt(request)
    assert (call.max_output_tokens, call.stop, call.temperature, call.seed) == (64, ["\n"], 1.0, None)  # type: ignore[union-attr]


# --- the real runtime ------------------------------------------------------------------------


def greedy_reference(model_dir: Path, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The runtime's greedy answer, outside the server (no sampling code on its path)."""
    model = LanguageModel.load(model_dir, execution_provider="cpu", intra_op_threads=1)
    prompt = model.encode_prompt([Message(m["role"], m["content"]) for m in messages])
    return model.completion(
        greedy_generate(model.decoder, prompt, max_new_tokens=max_tokens, eos_ids=model.eos_ids)
    ).text


async def test_tiny_model_greedy_sampling_max_tokens_and_stop(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = platform_env(
        tmp_path, ENABLED_PLUGINS="chat", OPENAI_API="true",
        MODELS_DIR=str(tiny_model_dir.parent), DEFAULT_MODEL=tiny_model_dir.name,
    )  # fmt: skip
    expected = greedy_reference(tiny_model_dir, HELLO, 40)
    async with serving(env) as (oai, client):
        ask: dict[str, Any] = {"model": tiny_model_dir.name, "messages": HELLO, "max_tokens": 40}
        greedy = await oai.chat.completions.create(**ask, temperature=0)
        assert greedy.choices[0].message.content == expected
        text, reason, _ = await streamed(oai, **ask, temperature=0)
        assert (text, reason) == (expected, greedy.choices[0].finish_reason)

        short = await oai.chat.completions.create(**{**ask, "max_tokens": 5}, temperature=0)
        assert short.usage is not None and short.usage.completion_tokens == 5
        assert short.choices[0].finish_reason == "length"

        seeded = [(await oai.chat.completions.create(**ask, seed=s, temperature=1.5)).choices[0].message.content
                  for s in (11, 11, 12)]  # fmt: skip
        assert seeded[0] == seeded[1] != seeded[2]
        assert seeded[0] != expected

        # A stop string: a word from the middle of the greedy answer; the answer ends before it.
        word = next(
            m for m in re.finditer(r"[A-Za-z]{4,}", expected) if m.start() > 10 and expected.find(m[0]) == m.start()
        )
        stopped = await oai.chat.completions.create(**ask, temperature=0, stop=[word[0], "never-seen"])
        assert stopped.choices[0].message.content == expected[: word.start()].strip()
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.usage is not None and stopped.usage.completion_tokens < 40
        text, reason, _ = await streamed(oai, **ask, temperature=0, stop=word[0])
        assert word[0] not in text and text.strip() == expected[: word.start()].strip() and reason == "stop"
        assert await chat_count(client) == 8


@pytest.mark.demo_model
async def test_demo_model_through_the_openai_client(tmp_path: Path, demo_model_dir: Path) -> None:
    env = platform_env(
        tmp_path, ENABLED_PLUGINS="chat", OPENAI_API="true",
        MODELS_DIR=str(demo_model_dir.parent), DEFAULT_MODEL=demo_model_dir.name,
    )  # fmt: skip
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    expected = greedy_reference(demo_model_dir, messages, 24)
    async with serving(env) as (oai, client):
        ask: dict[str, Any] = {"model": demo_model_dir.name, "messages": messages, "max_tokens": 24, "temperature": 0}
        completion = await oai.chat.completions.create(**ask)
        assert completion.choices[0].message.content == expected and "Paris" in expected
        started = time.perf_counter()
        stream = await oai.chat.completions.create(**ask, stream=True)
        first: float | None = None
        text = ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - started
            text += "".join(c.delta.content or "" for c in chunk.choices)
        assert text == expected and first is not None
        print(f"\ndemo model: first streamed text after {first * 1000:.0f} ms")
        assert await chat_count(client) == 2
