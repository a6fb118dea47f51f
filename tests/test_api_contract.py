"""The seed's HTTP contract: paths, fields, status codes and error bodies, through the real app.

The model is faked (ai_platform.testing.FakeEngine); usage runs on a real SQLite database.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.operations import ResponseMeta
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from support import ADMIN, ADMIN_KEY, CLASSIFY, CLIENT_KEY, ISO_UTC, KEY, SEED_MODELS, SUMMARIZE, TRANSLATE, assert_meta

pytestmark = pytest.mark.anyio


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(models=dict(SEED_MODELS))


@pytest.fixture
async def client(env: dict[str, str], engine: FakeEngine) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
    app = create_app(Settings.from_mapping(env), engine=engine)
    async with AsyncTestClient(app) as client:
        yield client


async def test_summarize(client: AsyncTestClient, engine: FakeEngine) -> None:  # type: ignore[type-arg]
    r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"summary", "sentence_count", "meta"}
    assert 1 <= body["sentence_count"] <= SUMMARIZE["max_sentences"]
    assert_meta(body["meta"], "summarize", SUMMARIZE)
    _, call = engine.calls[-1]
    assert SUMMARIZE["text"] in call.messages[-1].content  # type: ignore[attr-defined]


async def test_translate(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"translated_text", "source_language", "target_language", "meta"}
    assert (body["source_language"], body["target_language"]) == ("en", "ar")
    assert body["translated_text"]
    assert_meta(body["meta"], "translate", TRANSLATE)


async def test_classify(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.post("/operations/classify", json=CLASSIFY, headers=KEY)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"label", "confidence", "scores", "meta"}
    assert list(body["scores"]) == CLASSIFY["categories"]
    assert body["label"] == max(body["scores"], key=body["scores"].get)
    assert body["confidence"] == body["scores"][body["label"]]
    assert sum(body["scores"].values()) == pytest.approx(1.0)
    assert_meta(body["meta"], "classify", CLASSIFY)


async def test_request_id_is_optional(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.post("/operations/summarize", json={"text": "One. Two."}, headers=KEY)
    assert r.status_code == 200
    assert r.json()["meta"]["request_id"] is None


async def test_health_needs_no_key(client: AsyncTestClient, engine: FakeEngine) -> None:  # type: ignore[type-arg]
    r = await client.get("/health")
    assert r.status_code == 200
    body = r.json()
    for field in (
        "status",
        "uptime_seconds",
        "memory_used_mb",
        "memory_total_mb",
        "cpu_percent",
        "models",
        "timestamp",
    ):
        assert field in body
    assert body["status"] == "healthy"
    assert ISO_UTC.match(body["timestamp"])
    assert {m["name"] for m in body["models"]} == {f"{op} ({model})" for op, model in SEED_MODELS.items()}
    assert all(m["loaded"] and "provider" not in m for m in body["models"])  # details: admin key only
    assert body["memory_total_mb"] >= body["memory_used_mb"] > 0
    admin = (await client.get("/health", headers=ADMIN)).json()
    assert all(m["loaded"] and m["provider"] == "CPUExecutionProvider" for m in admin["models"])


async def test_limits(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.get("/limits", headers=KEY)
    assert r.status_code == 200
    assert sorted(r.json()["limits"], key=lambda x: x["operation"]) == [
        {"operation": "classify", "daily_limit": 1000, "max_input_chars": 2000, "max_output_tokens": 64, "max_input_tokens": 3072},
        {"operation": "summarize", "daily_limit": 1000, "max_input_chars": 8000, "max_output_tokens": 512, "max_input_tokens": 4096},
        {"operation": "translate", "daily_limit": 1000, "max_input_chars": 4000, "max_output_tokens": 512, "max_input_tokens": 2048},
    ]  # fmt: skip


async def test_put_limits_needs_admin_key(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    body = {"operation": "summarize", "daily_limit": 500}
    r = await client.put("/limits", json=body, headers=KEY)
    assert r.status_code == 403
    assert r.json() == {"detail": "This action requires an admin API key."}
    r = await client.put("/limits", json=body)
    assert r.status_code == 403
    assert r.json() == {"detail": "Invalid or missing API key."}

    r = await client.put("/limits", json=body, headers=ADMIN)
    assert r.status_code == 200
    assert r.json() == {
        "operation": "summarize", "daily_limit": 500, "max_input_chars": 8000, "max_output_tokens": 512,
        "max_input_tokens": 4096,
    }  # fmt: skip
    limits = {x["operation"]: x["daily_limit"] for x in (await client.get("/limits", headers=KEY)).json()["limits"]}
    assert limits == {"summarize": 500, "translate": 1000, "classify": 1000}


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        ({"operation": "nope", "daily_limit": 5}, ["body", "operation"], "enum"),
        ({"operation": "summarize", "daily_limit": -1}, ["body", "daily_limit"], "greater_than_equal"),
        ({"operation": "summarize"}, ["body", "daily_limit"], "missing"),
        ({"operation": "summarize", "daily_limit": "many"}, ["body", "daily_limit"], "int_type"),
    ],
)
async def test_put_limits_validation(
    client: AsyncTestClient, body: dict[str, object], loc: list[str], kind: str
) -> None:  # type: ignore[type-arg]
    r = await client.put("/limits", json=body, headers=ADMIN)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert r.json()["error"] == "Request validation failed."
    assert (detail[0]["type"], detail[0]["loc"]) == (kind, loc)


async def test_put_limits_persists_across_restarts(env: dict[str, str]) -> None:
    settings = Settings.from_mapping(env)
    async with AsyncTestClient(create_app(settings, engine=FakeEngine(models=dict(SEED_MODELS)))) as client:
        r = await client.put("/limits", json={"operation": "classify", "daily_limit": 7}, headers=ADMIN)
        assert r.status_code == 200
    async with AsyncTestClient(create_app(settings, engine=FakeEngine(models=dict(SEED_MODELS)))) as client:
        limits = (await client.get("/limits", headers=KEY)).json()["limits"]
        assert {x["operation"]: x["daily_limit"] for x in limits}["classify"] == 7


async def test_usage_counts_successes_only(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    tokens = 0
    for _ in range(3):
        r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        tokens += r.json()["meta"]["output_tokens"]
    # Rejected for auth or validation: not counted.
    await client.post("/operations/summarize", json=SUMMARIZE, headers={"X-API-Key": "wrong"})
    await client.post("/operations/summarize", json={"text": ""}, headers=KEY)
    r = await client.get("/limits/usage", headers=KEY)
    assert r.status_code == 200
    body = r.json()
    assert ISO_UTC.match(body["generated_at"])
    usage = {u["operation"]: u for u in body["usage"]}
    assert usage["summarize"] == {
        "operation": "summarize",
        "date": datetime.now(UTC).date().isoformat(),
        "request_count": 3,
        "total_tokens": tokens,
        "daily_limit": 1000,
        "remaining": 997,
    }
    assert usage["translate"]["request_count"] == 0


async def test_daily_limit_429(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    await client.put("/limits", json={"operation": "summarize", "daily_limit": 2}, headers=ADMIN)
    for _ in range(2):
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
    r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
    assert r.status_code == 429
    assert r.json() == {"detail": "Daily limit exceeded for operation 'summarize': 2/2 requests used today."}
    # Other operations have their own allowance.
    assert (await client.post("/operations/translate", json=TRANSLATE, headers=KEY)).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/operations/summarize"), ("get", "/limits"), ("put", "/limits"), ("get", "/limits/usage"),
     ("get", "/schema/openapi.json")],
)  # fmt: skip
@pytest.mark.parametrize(
    "headers", [{}, {"X-API-Key": "wrong-key"}, {"X-API-Key": ""}, {"X-API-Key": CLIENT_KEY + "x"}]
)
async def test_every_endpoint_but_health_needs_a_key(
    client: AsyncTestClient,
    method: str,
    path: str,
    headers: dict[str, str],  # type: ignore[type-arg]
) -> None:
    r = await client.request(method.upper(), path, json=SUMMARIZE, headers=headers)
    assert r.status_code == 403
    assert r.json() == {"detail": "Invalid or missing API key."}


BLANK = "String should have at least 1 non-whitespace character"


@pytest.mark.parametrize(
    ("operation", "body", "kind", "loc", "msg"),
    [
        ("summarize", {**SUMMARIZE, "text": "x" * 8001}, "string_too_long", ["body", "text"],
         "String should have at most 8000 characters"),
        ("translate", {**TRANSLATE, "text": "x" * 4001}, "string_too_long", ["body", "text"],
         "String should have at most 4000 characters"),
        ("classify", {**CLASSIFY, "text": "x" * 2001}, "string_too_long", ["body", "text"],
         "String should have at most 2000 characters"),
        ("summarize", {"max_sentences": 2}, "missing", ["body", "text"], "Field required"),
        ("summarize", {**SUMMARIZE, "text": ""}, "string_too_short", ["body", "text"],
         "String should have at least 1 character"),
        ("summarize", {**SUMMARIZE, "max_sentences": 0}, "greater_than_equal", ["body", "max_sentences"],
         "Input should be greater than or equal to 1"),
        ("summarize", {**SUMMARIZE, "max_sentences": "2"}, "int_type", ["body", "max_sentences"],
         "Input should be a valid integer"),
        ("summarize", {**SUMMARIZE, "extra": 1}, "extra_forbidden", ["body", "extra"], "Extra inputs are not permitted"),
        ("translate", {"text": "hi", "source_language": "en"}, "missing", ["body", "target_language"], "Field required"),
        ("classify", {**CLASSIFY, "categories": ["only"]}, "too_short", ["body", "categories"],
         "List should have at least 2 items after validation"),
        ("classify", {**CLASSIFY, "categories": ["a", 3]}, "string_type", ["body", "categories", 1],
         "Input should be a valid string"),
        ("classify", {**CLASSIFY, "categories": ["a", "a"]}, "value_error", ["body"],
         "Value error, categories must be unique"),
        ("classify", {**CLASSIFY, "categories": [f"c{i}" for i in range(51)]}, "too_long", ["body", "categories"],
         "List should have at most 50 items after validation"),
        ("summarize", {**SUMMARIZE, "request_id": "x" * 129}, "string_too_long", ["body", "request_id"],
         "String should have at most 128 characters"),
        # Whitespace only (issue 11 #3): nothing for the model to work on, refused before admission.
        ("summarize", {**SUMMARIZE, "text": "   "}, "string_too_short", ["body", "text"], BLANK),
        ("translate", {**TRANSLATE, "text": "\n\t \r\n"}, "string_too_short", ["body", "text"], BLANK),
        ("classify", {**CLASSIFY, "text": "\u3000\xa0 \u2003"}, "string_too_short", ["body", "text"], BLANK),
    ],
)  # fmt: skip
async def test_validation_errors_use_the_seed_format(
    client: AsyncTestClient,
    engine: FakeEngine,
    operation: str,
    body: dict[str, object],
    kind: str,  # type: ignore[type-arg]
    loc: list[object],
    msg: str,
) -> None:
    r = await client.post(f"/operations/{operation}", json=body, headers=KEY)
    assert r.status_code == 422
    payload = r.json()
    assert set(payload) == {"error", "detail"}
    assert payload["error"] == "Request validation failed."
    assert len(payload["detail"]) == 1
    entry = payload["detail"][0]
    assert set(entry) == {"type", "loc", "msg", "input"}
    assert (entry["type"], entry["loc"], entry["msg"]) == (kind, loc, msg)
    assert engine.calls == []  # rejected before any model work
    usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
    assert all(u["request_count"] == 0 for u in usage)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b"{not json", "application/json"), (b"", "application/json"), (b"\xff\xfe\x00", "application/json"),
     (b"[1, 2]", "application/json"), (b"null", "application/json")],
)  # fmt: skip
async def test_malformed_bodies_are_4xx_json(client: AsyncTestClient, content: bytes, content_type: str) -> None:  # type: ignore[type-arg]
    r = await client.post("/operations/summarize", content=content, headers={**KEY, "Content-Type": content_type})
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "Request validation failed."
    assert body["detail"][0]["type"] in {"json_invalid", "dict_type"}


async def test_body_size_limit(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.post("/operations/summarize", content=b'{"text": "' + b"x" * 300_000 + b'"}', headers=KEY)
    assert r.status_code == 413
    assert "detail" in r.json()


async def test_unknown_operation_404(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.post("/operations/sentiment", json={"text": "hi"}, headers=KEY)
    assert r.status_code == 404
    assert r.json() == {
        "detail": "Unknown operation 'sentiment'. Available operations: classify, summarize, translate."
    }
    r = await client.get("/no/such/path", headers=KEY)
    assert r.status_code == 404
    assert "detail" in r.json()


async def test_wrong_method_is_json(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.get("/operations/summarize", headers=KEY)
    assert r.status_code == 405
    assert "detail" in r.json()


async def test_model_unavailable_is_503_and_not_counted(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), unavailable={"translate"})
    async with AsyncTestClient(create_app(Settings.from_mapping(env), engine=engine)) as client:
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert r.status_code == 503
        assert r.headers["Retry-After"].isdigit()
        assert "not loaded" in r.json()["detail"]
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
        health = (await client.get("/health")).json()
        assert health["status"] == "degraded"
        usage = {
            u["operation"]: u["request_count"] for u in (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        }
        assert usage == {"summarize": 1, "translate": 0, "classify": 0}


async def test_unexpected_engine_error_is_a_bare_500_and_not_counted(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), fail_with=RuntimeError("secret internals"))
    async with AsyncTestClient(create_app(Settings.from_mapping(env), engine=engine)) as client:
        r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        assert r.status_code == 500
        assert r.json() == {"detail": "Internal server error."}
        usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        assert all(u["request_count"] == 0 for u in usage)


async def test_openapi_documents_each_operation(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.get("/schema/openapi.json", headers=KEY)
    assert r.status_code == 200
    doc = r.json()
    schemas = doc["components"]["schemas"]
    for name, request_fields, response_fields in [
        ("summarize", {"text", "max_sentences", "language", "request_id"}, {"summary", "sentence_count", "meta"}),
        ("translate", {"text", "source_language", "target_language", "request_id"},
         {"translated_text", "source_language", "target_language", "meta"}),
        ("classify", {"text", "categories", "request_id"}, {"label", "confidence", "scores", "meta"}),
    ]:  # fmt: skip
        post = doc["paths"][f"/operations/{name}"]["post"]
        assert "200" in post["responses"]
        request_ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
        response_ref = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
        assert set(schemas[request_ref]["properties"]) == request_fields | {"stream"}  # streaming: the platform's
        assert set(schemas[response_ref]["properties"]) == response_fields
    assert doc["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"


async def test_audit_trail_and_log_never_hold_keys(client: AsyncTestClient, env: dict[str, str]) -> None:  # type: ignore[type-arg]
    await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
    await client.post("/operations/summarize", json=SUMMARIZE, headers={"X-API-Key": "wrong-key-attempt"})
    await client.put("/limits", json={"operation": "summarize", "daily_limit": 9}, headers=ADMIN)
    db = sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite://"))
    db.row_factory = sqlite3.Row
    for _ in range(50):  # rows are written in batches, within 0.1 s
        records = db.execute("SELECT * FROM audit_record ORDER BY id").fetchall()
        if len(records) == 3:
            break
        await asyncio.sleep(0.05)
    assert [(r["operation"], r["status"]) for r in records] == [("summarize", 200), ("summarize", 403), (None, 200)]
    ok = records[0]
    assert ok["request_id"] == "req-001" and ok["output_tokens"] > 0 and ok["key_id"] and ok["duration_ms"] > 0
    assert records[1]["key_id"] is None
    assert records[2]["key_id"] != ok["key_id"]
    dump = " ".join(str(tuple(r)) for r in records)
    log_text = (Path(env["LOG_DIR"]) / "platform.log").read_text()
    assert "status=200" in log_text and ok["key_id"] in log_text
    for secret in (CLIENT_KEY, ADMIN_KEY, "wrong-key-attempt", env["SECRET_KEY"]):
        assert secret not in dump
        assert secret not in log_text


async def test_database_file_is_private(client: AsyncTestClient, env: dict[str, str]) -> None:  # type: ignore[type-arg]
    path = Path(env["DATABASE_URL"].removeprefix("sqlite://"))
    assert path.stat().st_mode & 0o777 == 0o600


async def test_plugin_bug_is_a_named_500_and_not_counted(env: dict[str, str]) -> None:
    import dataclasses
    import types

    from ai_platform import hookimpl
    from ai_platform.plugins import load_plugins
    from ai_platform_summarize import OPERATION

    def broken_respond(request: object, result: object, meta: object) -> object:
        raise KeyError("plugin bug")

    module = types.ModuleType("buggy")
    module.register_operations = hookimpl(lambda: [dataclasses.replace(OPERATION, respond=broken_respond)])  # type: ignore[attr-defined]
    plugins = load_plugins(extra_plugins=[("buggy", module)], use_entry_points=False)
    app = create_app(Settings.from_mapping(env), plugins=plugins, engine=FakeEngine(models=dict(SEED_MODELS)))
    async with AsyncTestClient(app) as client:
        r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        assert r.status_code == 500
        assert r.json() == {"detail": "Operation 'summarize' failed."}
        usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        assert usage[0]["request_count"] == 0


class AskRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    question: str
    context: str = ""


class AskResponse(msgspec.Struct, kw_only=True):
    answer: str
    meta: ResponseMeta


def _ask_plugins() -> Any:
    """A plugin whose operation ``ask`` reads its input from ``question``, not ``text``."""
    import types

    from ai_platform import Completion, Generate, Limits, Message, Operation, hookimpl
    from ai_platform.plugins import load_plugins

    def respond(request: AskRequest, result: Completion, meta: ResponseMeta) -> AskResponse:
        return AskResponse(answer=result.text, meta=meta)

    ask = Operation(
        name="ask",
        summary="Answer a question.",
        request_type=AskRequest,
        response_type=AskResponse,
        limits=Limits(max_input_chars=100, max_output_tokens=8),
        prompt=lambda r: Generate(messages=[Message("user", f"{r.context}\n{r.question}")]),
        respond=respond,
        input_text=lambda r: r.question,
    )
    module = types.ModuleType("ask")
    module.register_operations = hookimpl(lambda: [ask])  # type: ignore[attr-defined]
    return load_plugins(extra_plugins=[("ask", module)], use_entry_points=False)


async def test_whitespace_only_input_is_refused_for_any_operation(env: dict[str, str]) -> None:
    """The core refuses it for every operation, whichever field ``Operation.input_text`` names (issue 11 #3)."""
    engine = FakeEngine()
    settings = Settings.from_mapping({**env, "DEFAULT_MODEL": "fake"})
    async with AsyncTestClient(create_app(settings, plugins=_ask_plugins(), engine=engine)) as client:
        r = await client.post("/operations/ask", json={"question": " \n ", "context": "Some context."}, headers=KEY)
        assert r.status_code == 422
        assert r.json() == {
            "error": "Request validation failed.",
            "detail": [{"type": "string_too_short", "loc": ["body", "question"], "msg": BLANK, "input": " \n "}],
        }
        assert engine.calls == [] and engine.checks == []
        r = await client.post("/operations/ask", json={"question": "Why?"}, headers=KEY)
        assert r.status_code == 200
        usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        assert [(u["operation"], u["request_count"]) for u in usage] == [("ask", 1)]


class _CannotCount(FakeEngine):
    """An engine whose ``check`` cannot count: a prompt too long is refused by the model, after admission."""

    async def check(self, operation: str, call: Any) -> int | None:
        return None


@pytest.mark.parametrize("engine_type", [FakeEngine, _CannotCount])
async def test_a_prompt_too_long_names_the_operations_input_field(
    env: dict[str, str], engine_type: type[FakeEngine]
) -> None:
    """The engine's "too long" 422 points at the field ``input_text`` read (``question``), whether
    its ``check`` refuses the prompt before admission or the model does after it."""
    engine = engine_type(max_prompt_chars=30)
    settings = Settings.from_mapping({**env, "DEFAULT_MODEL": "fake"})
    async with AsyncTestClient(create_app(settings, plugins=_ask_plugins(), engine=engine)) as client:
        r = await client.post("/operations/ask", json={"question": "Why? " * 10}, headers=KEY)
        assert r.status_code == 422
        assert r.json() == {
            "error": "Request validation failed.",
            "detail": [
                {
                    "type": "string_too_long",
                    "loc": ["body", "question"],
                    "msg": "Input is too long for the model's context window (51 characters; at most 30).",
                    "input": None,
                }
            ],
        }
        assert len(engine.calls) == (0 if engine_type is FakeEngine else 1)
        usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        assert [(u["operation"], u["request_count"]) for u in usage] == [("ask", 0)]
