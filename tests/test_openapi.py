"""The OpenAPI document is true (issue 13, item 3).

A client generated from ``/schema/openapi.json`` by openapi-python-client calls every operation and
one error of each kind against the real server (uvicorn, a fake engine); every response it gets is
checked against what the document says of its route: a listed status, the documented headers, a
body valid against the documented schema. A status or body the document does not describe fails
the test. Another test walks the document for the statuses each kind of route must list. Both run
twice: with the built-in operations, and with ``OPENAI_API=true`` (``/v1``, OpenAI's error bodies,
and the operation ``chat``).
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import jsonschema_rs
import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.errors import EngineError
from ai_platform.settings import Settings
from ai_platform.testing import ADMIN_KEY, CLIENT_KEY, FakeEngine
from support import KEY, SEED_MODELS, SUMMARIZE, TRANSLATE
from test_disconnect import live_server

pytestmark = pytest.mark.anyio

GENERATOR = Path(sys.executable).with_name("openapi-python-client")
PACKAGE = "ai_platform_client"
RATE_LIMIT_HEADERS = {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"}
MODELS = {**SEED_MODELS, "chat": "qwen-chat"}  # with OPENAI_API=true: the operation behind /v1 has a model too
V1_ERRORS = {  # what each /v1 route answers besides its 200, all in OpenAI's body (ErrorBody)
    ("post", "/v1/chat/completions"): {"400", "403", "404", "413", "415", "429", "500", "502", "503", "504"},
    ("get", "/v1/models"): {"403", "500"},
    ("get", "/v1/models/{model_id}"): {"403", "404", "500"},
}


class Conformance:
    """Checks responses against the document: status listed, documented headers sent, body of the documented schema."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        # OpenAPI matches concrete paths before templated ones (/operations/summarize before /x/{y}).
        paths = sorted(document["paths"], key=lambda p: "{" in p)
        self.routes = [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$"), p) for p in paths]
        self.seen: list[tuple[str, int]] = []  # (operationId, status) of every response checked

    def operation(self, method: str, path: str) -> dict[str, Any]:
        found = next((p for pattern, p in self.routes if pattern.match(path)), None)
        assert found is not None, f"{method} {path}: not in the document"
        operation = self.document["paths"][found].get(method.lower())
        assert operation is not None, f"{method} {path}: the document has no {method} for {found}"
        return operation  # type: ignore[no-any-return]

    def check(self, response: httpx.Response) -> None:
        request = response.request
        where = f"{request.method} {request.url.path} -> {response.status_code}"
        operation = self.operation(request.method, request.url.path)
        documented = operation["responses"].get(str(response.status_code))
        assert documented is not None, f"{where}: not listed ({sorted(operation['responses'])}): {response.text[:200]}"
        for name, header in (documented.get("headers") or {}).items():
            value = response.headers.get(name)
            assert value is not None or not header.get("required"), f"{where}: no {name} header"
            if value is not None and header["schema"].get("type") == "integer":
                assert value.isdigit(), f"{where}: {name}: {value!r} is not an integer"
        content = documented.get("content")
        if not content:
            assert response.content == b"", f"{where}: a body the document does not describe"
        else:
            media_type = response.headers.get("content-type", "").split(";")[0].strip()
            media = {key.split(";")[0].strip(): value for key, value in content.items()}
            assert media_type in media, f"{where}: {media_type!r}, documented: {sorted(media)}"
            if media_type == "application/json":
                schema = {**media[media_type]["schema"], "components": self.document["components"]}
                problems = [e.message for e in jsonschema_rs.Draft202012Validator(schema).iter_errors(response.json())]
                assert not problems, f"{where}: the body does not match its schema: {problems}: {response.text[:300]}"
        self.seen.append((operation["operationId"], response.status_code))


def generate_client(document: dict[str, Any], folder: Path) -> None:
    """``openapi-python-client generate`` into ``folder``/ai_platform_client (offline; no formatter run)."""
    (folder / "openapi.json").write_text(json.dumps(document))
    (folder / "config.yaml").write_text(
        f"project_name_override: {PACKAGE}\npackage_name_override: {PACKAGE}\npost_hooks: []\n"
    )
    subprocess.run(
        [GENERATOR, "generate", "--path", "openapi.json", "--config", "config.yaml", "--meta", "none"],
        cwd=folder, check=True, capture_output=True, timeout=120,
    )  # fmt: skip


@pytest.fixture
def import_generated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Import the package generated into ``tmp_path``; forgotten again after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def load(name: str) -> ModuleType:
        return importlib.import_module(f"{PACKAGE}.{name}")

    yield load
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


@pytest.fixture(params=[False, True], ids=["operations", "openai-api"])
def openai_api(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def served_env(env: dict[str, str], openai_api: bool) -> dict[str, str]:
    """The built-in operations; with OPENAI_API=true also ``chat`` and ``/v1``."""
    if not openai_api:
        return env
    plugins = f"{env['ENABLED_PLUGINS']},chat"
    return {**env, "ENABLED_PLUGINS": plugins, "OPENAI_API": "true", "OPERATION_MODEL_MAP": json.dumps(MODELS)}


@pytest.fixture
def engine(openai_api: bool) -> FakeEngine:
    return FakeEngine(models=dict(MODELS if openai_api else SEED_MODELS))


@pytest.fixture
async def server(served_env: dict[str, str], engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    # A short timeout, so that one slow call shows the 504.
    app = create_app(Settings.from_mapping({**served_env, "REQUEST_TIMEOUT_SECONDS": "1"}), engine=engine)
    async with live_server(app) as (_, client):
        yield client


async def test_a_generated_client_calls_every_operation_and_gets_each_error_as_documented(
    server: httpx.AsyncClient, engine: FakeEngine, openai_api: bool, tmp_path: Path, import_generated: Any
) -> None:
    document = (await server.get("/schema/openapi.json", headers=KEY)).json()
    started = time.perf_counter()
    generate_client(document, tmp_path)
    generated_in = time.perf_counter() - started
    conformance = Conformance(document)

    async def check(response: httpx.Response) -> None:
        await response.aread()
        conformance.check(response)

    base = {
        "base_url": str(server.base_url),
        "raise_on_unexpected_status": True,  # a status the document does not list raises
        "httpx_args": {"event_hooks": {"response": [check]}},
    }
    client_module = import_generated("client")
    models = import_generated("models")
    keyed = {"auth_header_name": "X-API-Key", "prefix": ""}
    anonymous = client_module.Client(**base)
    client = client_module.AuthenticatedClient(token=CLIENT_KEY, **keyed, **base)
    admin = client_module.AuthenticatedClient(token=ADMIN_KEY, **keyed, **base)

    def op(tag: str, name: str) -> Any:
        return import_generated(f"api.{tag}.{name}").asyncio_detailed

    summarize = op("operations", "operation_summarize")
    translate = op("operations", "operation_translate")
    classify = op("operations", "operation_classify")
    put_limits = op("limits", "limits_put_limits")
    key_usage = op("quotas", "usage_keys_get_key_usage")

    async with anonymous, client, admin:
        # Every operation, answered 200 (204) and parsed into the generated models.
        r = await summarize(client=client, body=models.SummarizeRequest(**SUMMARIZE))
        assert isinstance(r.parsed, models.SummarizeResponse) and r.parsed.meta.request_id == "req-001"
        r = await translate(client=client, body=models.TranslateRequest(**TRANSLATE, stream=False))
        assert isinstance(r.parsed, models.TranslateResponse) and r.parsed.translated_text
        categories = ["billing", "technical_support"]
        r = await classify(
            client=client, body=models.ClassifyRequest(text="The router is down.", categories=categories)
        )
        assert isinstance(r.parsed, models.ClassifyResponse) and r.parsed.label in categories
        r = await op("limits", "limits_get_limits")(client=client)
        assert {e.operation for e in r.parsed.limits} == set(engine.models)
        r = await put_limits(client=admin, body=models.LimitUpdate(operation="summarize", daily_limit=500))
        assert r.parsed.daily_limit == 500
        r = await op("limits", "limits_usage_get_usage")(client=client)
        assert isinstance(r.parsed, models.UsageResponse)
        me = (await op("quotas", "usage_keys_me_get_my_usage")(client=client)).parsed.usage[0].key_id
        r = await op("quotas", "quotas_put_quota")(
            client=admin, body=models.QuotaUpdate(key_id=me, operation="translate", daily_limit=9)
        )
        assert r.parsed.daily_limit == 9
        r = await op("quotas", "quotas_get_quotas")(client=admin)
        assert [(q.key_id, q.daily_limit) for q in r.parsed.quotas] == [(me, 9)]
        r = await key_usage(client=admin, key_id=me)
        assert {u.key_id for u in r.parsed.usage} == {me}
        delete_quota = op("quotas", "quotas_key_id_operation_delete_quota")
        assert (await delete_quota(me, "translate", client=admin)).status_code == 204
        r = await op("system", "health_health")(client=anonymous)
        assert r.parsed.status == "healthy"
        r = await op("system", "health_health")(client=admin, deep=True)
        assert {c.operation for c in r.parsed.selftest} == set(engine.models)
        assert (await op("system", "health_health_head")(client=anonymous)).status_code == 200
        r = await op("plugins", "operations_list_operations")(client=client)
        assert {(o.name, o.daily_limit) for o in r.parsed.operations} == {
            ("summarize", 500), ("translate", 1000), ("classify", 1000), *([("chat", 1000)] if openai_api else [])
        }  # fmt: skip
        assert {p.name for p in (await op("plugins", "plugins_list_plugins")(client=admin)).parsed.plugins} >= {
            "summarize"
        }
        assert "ai_platform_requests_total" in (await op("system", "metrics_get_metrics")(client=admin)).parsed

        # Streaming: the generated request model carries "stream"; the events come as documented.
        sse = await client.get_async_httpx_client().post(
            "/operations/translate", json=models.TranslateRequest(**TRANSLATE, stream=True).to_dict()
        )
        assert sse.status_code == 200 and "event: result" in sse.text

        # One error of each kind, each parsed into the documented error model.
        r = await summarize(client=anonymous, body=models.SummarizeRequest(**SUMMARIZE))
        assert (r.status_code, r.parsed.detail) == (403, "Invalid or missing API key.")
        r = await op("plugins", "plugins_list_plugins")(client=client)
        assert (r.status_code, r.parsed.detail) == (403, "This action requires an admin API key.")
        assert (await op("system", "health_health")(client=client, deep=True)).status_code == 403
        r = await delete_quota(me, "translate", client=admin)
        assert (r.status_code, r.parsed.detail) == (404, "No such quota.")
        r = await key_usage(client=admin, key_id="0" * 16)
        assert r.status_code == 404 and isinstance(r.parsed, models.ErrorResponse)
        r = await summarize(client=client, body=models.SummarizeRequest(text="x" * 300_000))
        assert r.status_code == 413 and isinstance(r.parsed, models.ErrorResponse)
        r = await client.get_async_httpx_client().post(
            "/operations/summarize", content=b"text=hi", headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert r.status_code == 415
        r = await summarize(client=client, body=models.SummarizeRequest(text="x" * 8001))
        assert r.status_code == 422 and isinstance(r.parsed, models.ValidationErrorResponse)
        assert (r.parsed.detail[0].type_, r.parsed.detail[0].loc) == ("string_too_long", ["body", "text"])
        r = await key_usage(client=admin, key_id="not-a-key-id")
        assert r.status_code == 422 and r.parsed.detail[0].loc == ["query", "key_id"]
        r = await op("system", "health_health")(client=anonymous, deep="maybe")
        assert r.status_code == 422 and r.parsed.error == "Request validation failed."
        await put_limits(client=admin, body=models.LimitUpdate(operation="classify", daily_limit=0))
        r = await classify(client=client, body=models.ClassifyRequest(text="Hi.", categories=categories))
        assert r.status_code == 429 and r.parsed.detail.startswith("Daily limit exceeded for operation 'classify'")
        assert all(name in r.headers for name in [*RATE_LIMIT_HEADERS, "Retry-After"])
        engine.fail_with = RuntimeError("secret internals")
        r = await summarize(client=client, body=models.SummarizeRequest(**SUMMARIZE))
        assert (r.status_code, r.parsed.detail) == (500, "Internal server error.")
        engine.fail_with, engine.unavailable = None, {"translate"}
        r = await translate(client=client, body=models.TranslateRequest(**TRANSLATE))
        assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
        engine.unavailable, engine.delay = set(), 3.0  # past REQUEST_TIMEOUT_SECONDS=1
        r = await summarize(client=client, body=models.SummarizeRequest(**SUMMARIZE))
        assert r.status_code == 504 and isinstance(r.parsed, models.ErrorResponse)
        engine.delay, engine.fail_with = 0.0, EngineError("Remote engine 'gpu-01' answered 500.")
        r = await summarize(client=client, body=models.SummarizeRequest(**SUMMARIZE))
        assert (r.status_code, r.parsed.detail) == (502, "Remote engine 'gpu-01' answered 500.")
        engine.fail_with = None

        if openai_api:
            await openai_routes(client, anonymous, admin, engine, op, models)

    every_operation = {o["operationId"] for item in document["paths"].values() for o in item.values()}
    assert {operation_id for operation_id, _ in conformance.seen} == every_operation
    statuses = {s for _, s in conformance.seen}
    assert statuses >= {200, 204, 403, 404, 413, 415, 422, 429, 500, 502, 503, 504}
    if openai_api:  # every status the completions route documents, seen
        completions = {str(s) for o, s in conformance.seen if o == "openai_chat_completions"}
        assert completions == {"200", *V1_ERRORS[("post", "/v1/chat/completions")]}
    print(f"client generated in {generated_in:.1f} s; {len(conformance.seen)} responses checked")


async def openai_routes(client: Any, anonymous: Any, admin: Any, engine: FakeEngine, op: Any, models: Any) -> None:
    """``/v1`` and ``POST /operations/chat`` through the generated client: each route, then each error /v1 sends."""
    completions = op("openai", "openai_chat_completions")
    retrieve = op("openai", "openai_retrieve_model")
    operation_chat = op("operations", "operation_chat")
    hello = [models.ChatMessage(role=models.ChatMessageRole.USER, content="Say hello to the team")]

    def ask(**fields: Any) -> Any:
        return models.ChatCompletionRequest(**{"model": "qwen-chat", "messages": hello, **fields})

    r = await completions(client=client, body=ask(max_tokens=3))
    assert isinstance(r.parsed, models.ChatCompletion)
    assert r.parsed.choices[0].message.content.startswith("Say hello to")
    assert r.parsed.usage.completion_tokens == 3 and r.headers["X-Request-Id"] == r.parsed.id
    r = await op("openai", "openai_list_models")(client=client)
    assert isinstance(r.parsed, models.ModelList) and [m.id for m in r.parsed.data] == ["qwen-chat"]
    r = await retrieve("qwen-chat", client=client)
    assert isinstance(r.parsed, models.Model) and r.parsed.owned_by == "ai-platform"
    r = await operation_chat(client=client, body=models.ChatRequest(messages=hello, stream=False))
    assert isinstance(r.parsed, models.ChatResponse) and r.parsed.meta.operation == "chat"
    raw = client.get_async_httpx_client()
    sse = await raw.post("/v1/chat/completions", json=ask(stream=True).to_dict())
    assert sse.status_code == 200 and sse.text.rstrip().endswith("data: [DONE]")
    sse = await raw.post("/operations/chat", json=models.ChatRequest(messages=hello, stream=True).to_dict())
    assert sse.status_code == 200 and "event: result" in sse.text

    # One error of each kind /v1 sends, each parsed into the documented OpenAI body.
    async def error(status: int, call: Any, code: str | None, param: str | None = None) -> Any:
        r = await call
        assert r.status_code == status, r.content
        assert isinstance(r.parsed, models.ErrorBody), r.content
        assert (r.parsed.error.code, r.parsed.error.param) == (code, param), r.content
        return r

    await error(403, completions(client=anonymous, body=ask()), "invalid_api_key")
    await error(403, op("openai", "openai_list_models")(client=anonymous), "invalid_api_key")
    await error(403, retrieve("qwen-chat", client=anonymous), "invalid_api_key")
    await error(404, retrieve("gpt-4o", client=client), "model_not_found")
    await error(404, completions(client=client, body=ask(model="gpt-4o")), "model_not_found")
    await error(400, completions(client=client, body=ask(n=2)), "less_than_equal", "n")
    extra = ask()
    extra.additional_properties["tools"] = []
    await error(400, completions(client=client, body=extra), "extra_forbidden", "tools")
    huge = [models.ChatMessage(role=models.ChatMessageRole.USER, content="x" * 300_000)]
    await error(413, completions(client=client, body=ask(messages=huge)), "request_too_large")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = await raw.post("/v1/chat/completions", content=b"model=qwen-chat", headers=form)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    engine.fail_with = RuntimeError("secret internals")
    r = await error(500, completions(client=client, body=ask()), None)
    assert r.parsed.error.message == "Internal server error."
    engine.fail_with = EngineError("Remote engine 'gpu-01' answered 500.")
    await error(502, completions(client=client, body=ask()), None)
    r = await operation_chat(client=client, body=models.ChatRequest(messages=hello))
    assert r.status_code == 502 and isinstance(r.parsed, models.ErrorResponse)
    engine.fail_with, engine.unavailable = None, {"chat"}
    r = await error(503, completions(client=client, body=ask()), "service_unavailable")
    assert r.headers["Retry-After"].isdigit()
    engine.unavailable, engine.delay = set(), 3.0  # past REQUEST_TIMEOUT_SECONDS=1
    await error(504, completions(client=client, body=ask()), "timeout")
    engine.delay = 0.0
    limit = models.LimitUpdate(operation="chat", daily_limit=0)
    assert (await op("limits", "limits_put_limits")(client=admin, body=limit)).status_code == 200
    for stream in (False, True):  # a stream is refused before it starts: the same JSON 429
        r = await error(429, completions(client=client, body=ask(stream=stream)), "rate_limit_exceeded")
        assert all(name in r.headers for name in [*RATE_LIMIT_HEADERS, "Retry-After"])
    r = await operation_chat(client=client, body=models.ChatRequest(messages=hello))
    assert r.status_code == 429 and isinstance(r.parsed, models.ErrorResponse)


def lie(document: dict[str, Any], path: str, method: str, edit: Any) -> dict[str, Any]:
    changed = json.loads(json.dumps(document))
    edit(changed["paths"][path][method]["responses"])
    return changed


async def test_the_check_fails_when_the_document_lies(env: dict[str, str]) -> None:
    """A status left out, a body of another shape, a header left out: each is caught."""
    engine = FakeEngine(models=dict(SEED_MODELS))
    async with AsyncTestClient(create_app(Settings.from_mapping(env), engine=engine)) as client:
        document = (await client.get("/schema/openapi.json", headers=KEY)).json()
        forbidden = await client.post("/operations/summarize", json=SUMMARIZE)
        invalid = await client.post("/operations/summarize", json={"text": ""}, headers=KEY)
    Conformance(document).check(forbidden)
    Conformance(document).check(invalid)

    def no_403(responses: dict[str, Any]) -> None:
        del responses["403"]

    def plain_422(responses: dict[str, Any]) -> None:
        responses["422"] = responses["403"]

    def retry_after_on_403(responses: dict[str, Any]) -> None:
        responses["403"]["headers"] = responses["503"]["headers"]

    for edit, response, message in [
        (no_403, forbidden, "not listed"),
        (plain_422, invalid, "does not match its schema"),
        (retry_after_on_403, forbidden, "no Retry-After header"),
    ]:
        with pytest.raises(AssertionError, match=message):
            Conformance(lie(document, "/operations/summarize", "post", edit)).check(response)


async def test_every_route_documents_its_errors_and_no_400(
    served_env: dict[str, str], engine: FakeEngine, openai_api: bool
) -> None:
    async with AsyncTestClient(create_app(Settings.from_mapping(served_env), engine=engine)) as client:
        document = (await client.get("/schema/openapi.json", headers=KEY)).json()
    error_body = {"$ref": "#/components/schemas/ErrorResponse"}
    validation_body = {"$ref": "#/components/schemas/ValidationErrorResponse"}
    openai_body = {"$ref": "#/components/schemas/ErrorBody"}
    # What reads or writes the usage database answers 503 while it is unreachable; 404 where a thing is named.
    without_database = {("get", "/health"), ("get", "/plugins"), ("get", "/metrics")}
    not_found = {("delete", "/quotas/{key_id}/{operation}"), ("get", "/usage/keys")}
    known = {
        ("get", "/limits"), ("put", "/limits"), ("get", "/limits/usage"), ("get", "/quotas"), ("put", "/quotas"),
        ("get", "/usage/keys/me"), ("get", "/operations"), *without_database, *not_found,
    }  # fmt: skip
    routes = [(m, p, o) for p, item in document["paths"].items() for m, o in item.items()]
    assert known <= {(m, p) for m, p, _ in routes}
    v1_routes = {(m, p) for m, p, _ in routes if p.startswith("/v1/")}
    assert v1_routes == (set(V1_ERRORS) if openai_api else set())
    assert ("/operations/chat" in document["paths"]) == openai_api
    for method, path, operation in routes:
        where = f"{method.upper()} {path}"
        responses = operation["responses"]
        statuses = set(responses)
        v1 = (method, path) in V1_ERRORS
        if v1:  # OpenAI's errors: a body that does not validate is 400, every error body OpenAI's
            assert statuses == {"200", *V1_ERRORS[method, path]}, where
        else:
            assert "400" not in responses, where
        if method == "head":
            assert statuses == {"200"} and "content" not in responses["200"], where
            continue
        assert {"403", "500"} <= statuses, where  # /health: 403 for deep=true without an admin key
        if (method, path) in known:
            assert ("503" in statuses) == ((method, path) not in without_database), where
            assert ("404" in statuses) == ((method, path) in not_found), where
        if "requestBody" in operation:
            assert {"413", "415", "400" if v1 else "422"} <= statuses, where
        if any(p["in"] == "query" for p in operation.get("parameters", [])):
            assert "422" in statuses, where
        runs_operation = path.startswith("/operations/") or path == "/v1/chat/completions"
        if runs_operation:
            assert {"403", "413", "415", "429", "500", "502", "503", "504"} <= statuses, where
            assert ("400" if v1 else "422") in statuses, where
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                body = openai_body if v1 else validation_body if status == "422" else error_body
                assert response["content"] == {"application/json": {"schema": body}}, (where, status)
        if "503" in statuses:
            assert set(responses["503"]["headers"]) == {"Retry-After"}, where
        if "429" in statuses:
            assert set(responses["429"]["headers"]) == RATE_LIMIT_HEADERS | {"Retry-After"}, where
        if runs_operation:
            extra = {"X-Request-Id"} if v1 else set()  # /v1: the completion's id
            assert set(responses["200"]["headers"]) == RATE_LIMIT_HEADERS | extra, where
            assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}, where
            body = document["components"]["schemas"][
                operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
            ]
            assert "stream" not in body["required"], where
            if not v1:  # /v1: OpenAI's `stream`, a plain boolean with its default
                assert body["properties"]["stream"]["oneOf"] == [{"type": "boolean"}], where
        elif "200" in responses:
            assert not responses["200"].get("headers"), where
    schemas = document["components"]["schemas"]
    assert schemas["ErrorResponse"]["required"] == ["detail"]
    assert set(schemas["ValidationErrorResponse"]["required"]) == {"error", "detail"}
    assert set(schemas["ValidationErrorDetail"]["required"]) == {"type", "loc", "msg", "input"}
    if openai_api:
        assert schemas["ErrorBody"]["required"] == ["error"]
        assert set(schemas["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}
