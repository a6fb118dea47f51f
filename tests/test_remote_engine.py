"""Remote OpenAI-compatible engines as operation backends (issue 14, items 1 and 2).

Every failure is played by a real HTTP server on 127.0.0.1 that the test controls (``remote_fake.py``): down at
startup, dying mid-stream, slow, answering garbage or errors. The app runs with the real ``build_engine`` over
``OPERATION_MODEL_MAP`` values ``openai+http://127.0.0.1:PORT/v1#MODEL``, a small circuit breaker and fast probes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.engine_router import build_engine
from ai_platform.errors import ConfigurationError, EngineError, ServiceUnavailableError
from ai_platform.operations import Generate, Message, TextDelta
from ai_platform.plugins import load_plugins
from ai_platform.remote.circuit import CircuitBreaker
from ai_platform.remote.engine import FLOOR, RemoteEngine, match_option, score_options
from ai_platform.remote.target import parse_target
from ai_platform.settings import Settings
from remote_fake import FakeOpenAIServer, Reply
from support import ADMIN, CLASSIFY, KEY, TRANSLATE

API_KEY = "engine-key-Zq8xW3v9Lr2Tn6"  # must appear nowhere but in the engine's Authorization header
OPERATIONS = ("translate", "classify")


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer()
    try:
        yield server
    finally:
        server.close()


def _app(env: dict[str, str], models: dict[str, str], **remote: Any) -> Any:
    settings = Settings.from_mapping({**env, "OPERATION_MODEL_MAP": json.dumps(models)})
    options = {"failures": 5, "cool_down": 30.0, "probe_delays": (0.05, 0.2), **remote}
    engine = build_engine(settings, models, environ={"FAKE_ENGINE_KEY": API_KEY}, **options)
    return create_app(settings, plugins=load_plugins(enabled=list(models)), engine=engine)


@asynccontextmanager
async def _client(app: Any) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app) as client:
        yield client


async def _until(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def _loaded(client: AsyncTestClient[Any]) -> bool:
    return bool(all(m["loaded"] for m in (await client.get("/health", headers=ADMIN)).json()["models"]))


async def _counted(client: AsyncTestClient[Any], operation: str) -> int:
    usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
    found = [row for row in usage if row["operation"] == operation]
    return int(found[0]["request_count"]) if found else 0


# -- the syntax ------------------------------------------------------------------------------------


def test_target_syntax() -> None:
    value = (
        "openai+https://gpu-01:8443/v1?key_env=GPU01_API_KEY&ca_file=/etc/ca.pem&timeout=120"
        "&connect_timeout=5&choose=generate#Qwen2.5-7B-Instruct"
    )
    target = parse_target(value, setting="X")
    assert (target.base_url, target.model, target.key_env, target.ca_file) == (
        "https://gpu-01:8443/v1", "Qwen2.5-7B-Instruct", "GPU01_API_KEY", "/etc/ca.pem",
    )  # fmt: skip
    assert (target.timeout, target.connect_timeout, target.choose) == (120.0, 5.0, "generate")
    assert parse_target("openai+http://h:1/v1#m", setting="X").timeout is None


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("openai+http://h:1/v1", "no model id"),
        ("openai+http://u:secret@h:1/v1#m", "credentials"),
        ("openai+http://h:1/v1?colour=red#m", "unknown option 'colour'"),
        ("openai+http://h:1/v1?ca_file=/x#m", "ca_file needs openai+https"),
        ("openai+http://h:1/v1?timeout=0#m", "'timeout' must be a number"),
        ("openai+http://h:1/v1?choose=vote#m", "choose must be one of"),
        ("openai+ftp://h:1/v1#m", "unknown scheme"),
    ],
)
def test_invalid_targets_stop_startup_naming_the_setting(env: dict[str, str], value: str, why: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_mapping({**env, "OPERATION_MODEL_MAP": json.dumps({"classify": value})})
    assert str(caught.value).startswith("OPERATION_MODEL_MAP['classify']: ") and why in str(caught.value)
    assert "secret" not in str(caught.value)


def test_unset_key_variable_is_a_configuration_error(env: dict[str, str], fake: FakeOpenAIServer) -> None:
    models = {"translate": fake.url(key_env="NOT_SET_ANYWHERE")}
    settings = Settings.from_mapping({**env, "OPERATION_MODEL_MAP": json.dumps(models)})
    with pytest.raises(ConfigurationError, match=r"OPERATION_MODEL_MAP\['translate'\]: .*NOT_SET_ANYWHERE"):
        build_engine(settings, models, environ={})


def test_only_remote_engines_load_no_runtime(env: dict[str, str], fake: FakeOpenAIServer) -> None:
    models = {"translate": fake.url(), "classify": fake.url("other")}
    settings = Settings.from_mapping({**env, "OPERATION_MODEL_MAP": json.dumps(models)})
    engine = build_engine(settings, models)
    assert isinstance(engine, RemoteEngine)
    assert len({id(b.client) for b in engine._backends.values()}) == 1  # same engine and options: one pool


# -- scoring ---------------------------------------------------------------------------------------


def test_scoring_by_first_token_candidates() -> None:
    scores, groups = score_options(
        [(" billing", 0.6), ("tech", 0.3), ("Card", 0.05)], ["billing", "technical", "card a", "card b", "sales"]
    )
    assert scores["billing"] == 0.6 and scores["technical"] == 0.3 and scores["sales"] == FLOOR
    assert ["card a", "card b"] in groups
    assert match_option(" Technical_support.", ["billing", "technical_support"]) == "technical_support"
    assert match_option("It is about card activation", ["card", "card activation"]) == "card activation"
    assert match_option("no idea", ["billing"]) is None


def test_circuit_breaker_states() -> None:
    now = [0.0]
    breaker = CircuitBreaker(2, 10.0, clock=lambda: now[0])
    breaker.failed()
    assert not breaker.refuses()
    breaker.failed()
    assert breaker.refuses() and breaker.retry_after() == 10
    now[0] = 10.5
    assert breaker.acquire() and breaker.refuses()  # half-open: this one is the probe, others wait
    breaker.failed()
    assert breaker.refuses() and breaker.retry_after() == 10
    now[0] = 21
    assert breaker.acquire()
    breaker.succeeded()
    assert breaker.closed and not breaker.refuses()


# -- through the app -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_generate_choose_and_stream_through_a_remote_engine(env: dict[str, str], fake: FakeOpenAIServer) -> None:
    models = {"translate": fake.url(key_env="FAKE_ENGINE_KEY"), "classify": fake.url(key_env="FAKE_ENGINE_KEY")}
    async with _client(_app(env, models)) as client:
        await _until(lambda: _loaded(client))
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert r.status_code == 200, r.text
        assert r.json()["translated_text"] == "Bonjour tout le monde."
        assert r.json()["meta"]["model_used"] == fake.model and r.json()["meta"]["output_tokens"] == 3
        sent = fake.chat_requests()[-1]
        assert sent.headers["authorization"] == f"Bearer {API_KEY}"
        assert sent.body is not None and sent.body["stream"] is True and sent.body["model"] == fake.model
        assert sent.body["stream_options"] == {"include_usage": True} and sent.body["temperature"] == 0.0
        assert isinstance(sent.body["max_tokens"], int)

        fake.replies.append(Reply(top_logprobs=[("tech", -0.3), (" billing", -1.5), ("x", -3.0)], usage=1))
        r = await client.post("/operations/classify", json=CLASSIFY, headers=KEY)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] == "technical_support" and abs(sum(body["scores"].values()) - 1) < 1e-9
        assert body["confidence"] == body["scores"]["technical_support"]
        sent = fake.chat_requests()[-1]
        assert sent.body is not None and sent.body["logprobs"] is True and sent.body["max_tokens"] == 1

        # Two categories share their first token: a short greedy answer tells them apart.
        fake.replies.extend([Reply(top_logprobs=[("card", -0.1), ("bill", -3.0)]), Reply(answer="card activation")])
        tied = {**CLASSIFY, "categories": ["card lost", "card activation", "billing"]}
        r = await client.post("/operations/classify", json=tied, headers=KEY)
        assert r.status_code == 200 and r.json()["label"] == "card activation", r.text

        r = await client.post("/operations/translate", json={**TRANSLATE, "stream": True}, headers=KEY)
        assert r.status_code == 200 and "event: delta" in r.text and "event: result" in r.text
        assert await _counted(client, "translate") == 2


@pytest.mark.anyio
async def test_choose_by_generating_for_engines_without_logprobs(env: dict[str, str], fake: FakeOpenAIServer) -> None:
    models = {"classify": fake.url(choose="generate")}
    async with _client(_app(env, models)) as client:
        await _until(lambda: _loaded(client))
        fake.replies.append(Reply(answer="Technical_support."))
        r = await client.post("/operations/classify", json=CLASSIFY, headers=KEY)
        assert r.status_code == 200 and r.json()["label"] == "technical_support", r.text
        assert "logprobs" not in (fake.chat_requests()[-1].body or {})
        fake.replies.append(Reply(answer="I like turtles"))
        r = await client.post("/operations/classify", json=CLASSIFY, headers=KEY)
        assert r.status_code == 502 and f"127.0.0.1:{fake.port}" in r.json()["detail"]
        assert await _counted(client, "classify") == 1


@pytest.mark.anyio
async def test_engine_down_at_startup_then_up(env: dict[str, str], fake: FakeOpenAIServer) -> None:
    fake.stop()
    models = {"translate": fake.url()}
    async with _client(_app(env, models, probe_delays=(0.2, 0.5))) as client:
        await _until(lambda: _health_error(client))
        health = (await client.get("/health", headers=ADMIN)).json()
        assert health["status"] == "degraded" and health["models"][0]["loaded"] is False
        assert health["models"][0]["provider"] == "openai-compatible" and health["models"][0]["error"]
        assert health["models"][0]["path"] == f"http://127.0.0.1:{fake.port}/v1"
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
        assert fake.chat_requests() == []  # refused before admission, without trying
        fake.start()
        await _until(lambda: _loaded(client))
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert r.status_code == 200, r.text
        assert await _counted(client, "translate") == 1


async def _health_error(client: AsyncTestClient[Any]) -> bool:
    return bool((await client.get("/health", headers=ADMIN)).json()["models"][0]["error"])


@pytest.mark.anyio
async def test_engine_dies_mid_stream_nothing_counted(env: dict[str, str], fake: FakeOpenAIServer) -> None:
    async with _client(_app(env, {"translate": fake.url()})) as client:
        await _until(lambda: _loaded(client))
        fake.replies.append(Reply(drop_after=1))
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert r.status_code == 503 and "Retry-After" in r.headers, r.text
        assert f"127.0.0.1:{fake.port}" in r.json()["detail"]
        assert len(fake.chat_requests()) == 1  # a token had arrived: never retried
        assert await _counted(client, "translate") == 0
        assert (await client.get("/limits/usage", headers=KEY)).status_code == 200


@pytest.mark.anyio
async def test_slow_engine_times_out_and_its_request_is_cancelled(env: dict[str, str], fake: FakeOpenAIServer) -> None:
    async with _client(_app(env, {"translate": fake.url(timeout=0.5)})) as client:
        await _until(lambda: _loaded(client))
        fake.replies.append(Reply(delay=10))
        started = time.monotonic()
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert r.status_code == 504 and time.monotonic() - started < 5, r.text
        assert f"127.0.0.1:{fake.port}" in r.json()["detail"]
        await _until(_async(lambda: fake.cancelled == 1), 5)
        assert await _counted(client, "translate") == 0


def _async(predicate: Any) -> Any:
    async def check() -> bool:
        return bool(predicate())

    return check


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (Reply(raw=b"<html>not json</html>"), 502),
        (Reply(raw=b'{"choices": "wrong shape"}'), 502),
        (Reply(status=500, raw=b'{"error": {"message": "Traceback (most recent call last): internals"}}'), 502),
        (Reply(status=404, raw=b'{"error": {"message": "The model does not exist."}}'), 502),
        (Reply(status=503, raw=b"overloaded", headers={"Retry-After": "7"}), 503),
    ],
    ids=["not-json", "wrong-shape", "500", "404", "busy"],
)
async def test_garbage_and_error_statuses(
    env: dict[str, str], fake: FakeOpenAIServer, reply: Reply, status: int
) -> None:
    if reply.raw is not None and reply.status == 200:
        reply.headers = {"Content-Type": "text/event-stream"}
    async with _client(_app(env, {"translate": fake.url()})) as client:
        await _until(lambda: _loaded(client))
        fake.replies.append(reply)
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert f"127.0.0.1:{fake.port}" in detail and "Traceback" not in detail and "internals" not in detail
        if status == 503:
            assert r.headers["Retry-After"] == "7"
        assert await _counted(client, "translate") == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (  # vLLM's and llama-cpp-python's wording: the requested count includes the answer's max_tokens
            "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
            "(4900 in the messages, 100 in the completion). Please reduce the length of the messages or completion.",
            "(4900 tokens; at most 3996)",
        ),
        ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.", "(5000 tokens; at most 4096)"),
        ("request (5000 tokens) exceeds the available context size (4096 tokens), try increasing it", "(5000 tokens; at most 4096)"),
    ],
)  # fmt: skip
async def test_context_too_long_is_the_422(
    env: dict[str, str], fake: FakeOpenAIServer, message: str, expected: str
) -> None:
    async with _client(_app(env, {"translate": fake.url()})) as client:
        await _until(lambda: _loaded(client))
        fake.replies.append(Reply(status=400, raw=json.dumps({"error": {"message": message}}).encode()))
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert r.status_code == 422, r.text
        (entry,) = r.json()["detail"]
        assert entry["type"] == "string_too_long" and entry["loc"] == ["body", "text"] and expected in entry["msg"]


@pytest.mark.anyio
async def test_circuit_breaker_answers_503_at_once(env: dict[str, str], fake: FakeOpenAIServer) -> None:
    async with _client(_app(env, {"translate": fake.url()}, failures=2, cool_down=1.0)) as client:
        await _until(lambda: _loaded(client))
        fake.replies.extend([Reply(status=500), Reply(status=500)])
        for _ in range(2):
            assert (await client.post("/operations/translate", json=TRANSLATE, headers=KEY)).status_code == 502
        started = time.monotonic()
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and time.monotonic() - started < 0.5
        assert len(fake.chat_requests()) == 2  # refused before admission, the engine never asked
        assert not (await client.get("/health", headers=ADMIN)).json()["models"][0]["loaded"]
        await asyncio.sleep(1.1)  # cool-down over: one probe request, which succeeds and closes the circuit
        assert (await client.post("/operations/translate", json=TRANSLATE, headers=KEY)).status_code == 200
        assert (await client.post("/operations/translate", json=TRANSLATE, headers=KEY)).status_code == 200
        assert await _counted(client, "translate") == 2


@pytest.mark.anyio
async def test_the_api_key_is_sent_and_never_shown(env: dict[str, str], fake: FakeOpenAIServer, tmp_path: Path) -> None:
    models = {"translate": fake.url(key_env="FAKE_ENGINE_KEY")}
    shown: list[str] = []
    async with _client(_app(env, models)) as client:
        await _until(lambda: _loaded(client))
        for reply in (Reply(), Reply(status=401, raw=b'{"error": {"message": "bad key"}}'), Reply(raw=b"junk")):
            fake.replies.append(reply)
            r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
            shown += [r.text, json.dumps(dict(r.headers))]
        shown.append((await client.get("/health", headers=ADMIN)).text)
        shown.append((await client.get("/metrics", headers=ADMIN)).text)
    assert all(seen.headers.get("authorization") == f"Bearer {API_KEY}" for seen in fake.requests)
    assert not any(API_KEY in text for text in shown)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]  # platform.log, the usage database (audit trail)
    assert any(p.name == "platform.log" for p in files)
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path


# -- the engine alone ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_connect_errors_are_retried_before_the_first_byte(fake: FakeOpenAIServer) -> None:
    target = parse_target(fake.url(), setting="X").with_default_timeout(5)
    engine = RemoteEngine({"translate": target}, connect_retry_delay=1.0, probe_delays=(60, 60))
    call = Generate(messages=[Message("user", "hi")])
    await engine.start()
    try:
        await _until(_async(lambda: engine.status()[0].loaded))
        fake.stop()
        threading.Timer(0.3, fake.start).start()  # up again between the first attempt and the second
        completion = await engine.generate("translate", call, max_output_tokens=8)
        assert completion.text == "Bonjour tout le monde." and completion.finish_reason == "stop"
        assert len(fake.chat_requests()) == 1
        fake.stop()  # down for both attempts: 503, named
        with pytest.raises(ServiceUnavailableError, match=f"127.0.0.1:{fake.port}"):
            await engine.generate("translate", call, max_output_tokens=8)
        fake.start()
        fake.replies.append(Reply(usage=None, chunks=("a", "b"), finish_reason="length"))
        completion = await engine.generate("translate", call, max_output_tokens=2)
        assert (completion.output_tokens, completion.finish_reason) == (2, "length")  # no usage: chunks counted
        fake.replies.append(Reply(raw=b'{"choices": []}'))
        with pytest.raises(EngineError):
            await engine.generate("translate", call, max_output_tokens=2)
    finally:
        await engine.close()


@pytest.mark.anyio
async def test_logprobs_are_asked_for_and_passed_through(fake: FakeOpenAIServer) -> None:
    """A Generate asking for logprobs (``/v1``'s ``logprobs``) gets the engine's, per delta and whole; bytes filled in."""
    target = parse_target(fake.url(), setting="X").with_default_timeout(5)
    engine = RemoteEngine({"chat": target}, probe_delays=(60, 60))
    top = {"token": "Bon", "logprob": -0.1, "bytes": [66, 111, 110]}
    per_chunk = [
        [{"token": "Bon", "logprob": -0.1, "bytes": [66, 111, 110], "top_logprobs": [top]}],
        [{"token": "jour", "logprob": -0.5, "top_logprobs": [{"token": "soir", "logprob": -1.2}]}],  # no bytes
    ]
    await engine.start()
    try:
        await _until(_async(lambda: engine.status()[0].loaded))
        fake.replies.append(Reply(chunks=("Bon", "jour"), usage=2, chunk_logprobs=per_chunk))
        call = Generate(messages=[Message("user", "hi")], logprobs=1)
        items = [item async for item in engine.stream("chat", call, max_output_tokens=8)]
        sent = fake.chat_requests()[-1].body or {}
        assert (sent["logprobs"], sent["top_logprobs"]) == (True, 1)
        deltas, completion = items[:-1], items[-1]
        assert all(isinstance(delta, TextDelta) for delta in deltas) and "".join(deltas) == "Bonjour"
        assert [lp.token for delta in deltas for lp in delta.logprobs] == ["Bon", "jour"]
        assert completion.logprobs is not None and [lp.logprob for lp in completion.logprobs] == [-0.1, -0.5]
        assert completion.logprobs[1].bytes == list(b"jour") and completion.logprobs[1].top_logprobs[0].bytes == list(
            b"soir"
        )

        fake.replies.append(Reply(chunks=("x",), usage=1))
        completion = await engine.generate("chat", Generate(messages=[Message("user", "hi")]), max_output_tokens=8)
        assert "logprobs" not in (fake.chat_requests()[-1].body or {}) and completion.logprobs is None

        fake.replies.append(Reply(chunks=("x",), usage=1, chunk_logprobs=[[{"token": 3}]]))  # not OpenAI's format
        with pytest.raises(EngineError):
            await engine.generate("chat", call, max_output_tokens=8)

        fake.replies.append(Reply(chunks=("Bon", "jour"), usage=None))  # an engine that ignores logprobs
        completion = await engine.generate("chat", call, max_output_tokens=8)
        assert completion.text == "Bonjour" and completion.logprobs is None and completion.output_tokens == 2
    finally:
        await engine.close()
