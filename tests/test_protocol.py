"""Strict requests at the API's edge (issue 11): the body's media type, duplicate JSON keys, what a 404
echoes back, key ids in queries, whitespace around the API key, and OpenAPI pages that need no internet.

The limits on the request head are in ``tests/reliability/test_protocol_limits.py`` (the real server).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from ai_platform.api.validation import decode_body
from ai_platform.app import create_app
from ai_platform.errors import RequestValidationError
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from support import ADMIN, ADMIN_KEY, CLASSIFY, CLIENT_KEY, KEY, SEED_MODELS, SUMMARIZE

pytestmark = pytest.mark.anyio

VALIDATION = "Request validation failed."


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(models=dict(SEED_MODELS))


@pytest.fixture
async def client(env: dict[str, str], engine: FakeEngine) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
    async with AsyncTestClient(create_app(Settings.from_mapping(env), engine=engine)) as c:
        yield c


async def _nothing_counted(client: AsyncTestClient) -> bool:  # type: ignore[type-arg]
    usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
    return all(u["request_count"] == 0 for u in usage)


# The body's media type


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/jsonp",
        "application/json-patch+json",
        "application/json; charset=latin-1",
        "",
        "json",
    ],
)
async def test_a_body_sent_as_another_media_type_is_415(
    client: AsyncTestClient,  # type: ignore[type-arg]
    engine: FakeEngine,
    content_type: str,
) -> None:
    r = await client.post(
        "/operations/summarize", content=json.dumps(SUMMARIZE), headers={**KEY, "Content-Type": content_type}
    )
    assert r.status_code == 415, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"detail"} and "application/json" in body["detail"]
    assert engine.calls == []
    assert await _nothing_counted(client)


async def test_a_form_body_is_415(client: AsyncTestClient, engine: FakeEngine) -> None:  # type: ignore[type-arg]
    r = await client.post("/operations/summarize", data={"text": SUMMARIZE["text"]}, headers=KEY)
    assert r.status_code == 415, r.text
    assert engine.calls == []


async def test_two_content_types_are_415(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    headers = [("X-API-Key", CLIENT_KEY), ("Content-Type", "application/json"), ("Content-Type", "text/plain")]
    r = await client.post("/operations/summarize", content=json.dumps(SUMMARIZE), headers=headers)
    assert r.status_code == 415, r.text


@pytest.mark.parametrize(
    ("method", "path", "body", "headers"),
    [
        ("PUT", "/limits", {"operation": "summarize", "daily_limit": 5}, ADMIN),
        ("PUT", "/quotas", {"key_id": "0" * 16, "operation": "summarize", "daily_limit": 5}, ADMIN),
        ("POST", "/operations/classify", CLASSIFY, KEY),
    ],
)
async def test_every_body_is_checked_for_its_media_type(
    client: AsyncTestClient,  # type: ignore[type-arg]
    method: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> None:
    r = await client.request(method, path, content=json.dumps(body), headers={**headers, "Content-Type": "text/plain"})
    assert r.status_code == 415, r.text
    assert set(r.json()) == {"detail"}


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", 'Application/JSON;charset="UTF-8"', None],
    ids=["plain", "charset", "case-and-quotes", "none"],
)
async def test_json_is_accepted_and_so_is_a_body_without_content_type(
    client: AsyncTestClient,  # type: ignore[type-arg]
    content_type: str | None,
) -> None:
    # No Content-Type at all: the body is read as JSON, as the seed (FastAPI) did.
    headers = KEY if content_type is None else {**KEY, "Content-Type": content_type}
    r = await client.post("/operations/summarize", content=json.dumps(SUMMARIZE), headers=headers)
    assert r.status_code == 200, r.text


async def test_the_media_type_is_checked_after_the_key(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.post("/operations/summarize", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 403


# Duplicate keys in JSON objects


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/operations/summarize", b'{"text": "first text", "text": "second text"}', ["body", "text"]),
        (
            "/operations/classify",
            b'{"text": "t", "categories": ["a", "b"], "request_id": "r", "categories": ["c", "d"]}',
            ["body", "categories"],
        ),
    ],
)
async def test_duplicate_keys_are_refused_422(
    client: AsyncTestClient,  # type: ignore[type-arg]
    engine: FakeEngine,
    path: str,
    body: bytes,
    loc: list[object],
) -> None:
    r = await client.post(path, content=body, headers={**KEY, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    payload = r.json()
    assert payload["error"] == VALIDATION
    assert payload["detail"] == [
        {"type": "json_invalid", "loc": loc, "msg": f"Invalid JSON: duplicate key '{loc[-1]}'", "input": None}
    ]
    assert engine.calls == []
    assert await _nothing_counted(client)


async def test_duplicate_keys_in_put_limits_are_refused(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    body = b'{"operation": "summarize", "daily_limit": 5, "daily_limit": 0}'
    r = await client.put("/limits", content=body, headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "daily_limit"], r.text
    limits = (await client.get("/limits", headers=KEY)).json()["limits"]
    assert {entry["daily_limit"] for entry in limits} == {1000}  # nothing changed


class _Inner(msgspec.Struct):
    b: int


class _Outer(msgspec.Struct):
    a: list[_Inner]
    c: dict[str, int]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (b'{"a": [{"b": 1}, {"b": 1, "b": 2}], "c": {}}', ["body", "a", 1, "b"]),
        (b'{"a": [], "c": {"x": 1, "y": 2, "x": 3}}', ["body", "c", "x"]),
        (b'{"a": [], "c": {}, "a": []}', ["body", "a"]),
    ],
)
def test_nested_duplicate_keys_name_their_place(body: bytes, loc: list[object]) -> None:
    with pytest.raises(RequestValidationError) as raised:
        decode_body(body, _Outer)
    assert raised.value.errors == [
        {"type": "json_invalid", "loc": loc, "msg": f"Invalid JSON: duplicate key '{loc[-1]}'", "input": None}
    ]


def test_the_same_key_in_different_objects_is_fine() -> None:
    assert decode_body(b'{"a": [{"b": 1}, {"b": 2}], "c": {"b": 3}}', _Outer) == _Outer(
        a=[_Inner(1), _Inner(2)], c={"b": 3}
    )


# What a 404 echoes back


async def test_a_huge_unknown_operation_name_is_not_echoed_whole(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    name = "x" * 10_000
    r = await client.post(f"/operations/{name}", json={"text": "hi"}, headers=KEY)
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert len(r.content) < 300, r.content[:400]
    assert detail == f"Unknown operation '{'x' * 64}…'. Available operations: classify, summarize, translate."


async def test_control_characters_in_an_unknown_name_are_escaped(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.post("/operations/a%1b%5B31mb%0Ac%C2%85", json={"text": "hi"}, headers=KEY)
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", detail), detail
    assert detail.startswith("Unknown operation 'a\\x1b[31mb\\nc\\x85'.")


async def test_a_plausible_unknown_name_reads_as_before(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.post("/operations/sentiment", json={"text": "hi"}, headers=KEY)
    assert r.json() == {
        "detail": "Unknown operation 'sentiment'. Available operations: classify, summarize, translate."
    }


# Key ids in queries and bodies


@pytest.mark.parametrize("key_id", ["../../x", "0123", "0123456789ABCDEF", "0123456789abcdef0", "x" * 5000, ""])
async def test_a_malformed_key_id_in_the_query_is_422(client: AsyncTestClient, key_id: str) -> None:  # type: ignore[type-arg]
    r = await client.get("/usage/keys", params={"key_id": key_id}, headers=ADMIN)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert payload["error"] == VALIDATION
    [entry] = payload["detail"]
    assert set(entry) == {"type", "loc", "msg", "input"}
    assert (entry["type"], entry["loc"]) == ("string_pattern_mismatch", ["query", "key_id"])
    assert entry["msg"] == "String should match pattern '^[0-9a-f]{16}$'"
    assert len(r.content) < 400


async def test_a_well_formed_unknown_key_id_is_404(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.get("/usage/keys", params={"key_id": "0123456789abcdef"}, headers=ADMIN)
    assert r.status_code == 404
    assert r.json() == {"detail": "No configured key has the id '0123456789abcdef'."}


async def test_a_key_id_in_a_quota_is_16_hex_characters(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.put(
        "/quotas", headers=ADMIN, json={"key_id": "0123abcd", "operation": "summarize", "daily_limit": 1}
    )
    assert r.status_code == 422
    assert (r.json()["detail"][0]["type"], r.json()["detail"][0]["loc"]) == ("string_too_short", ["body", "key_id"])


# Whitespace around the API key (the real parser's side: tests/reliability/test_protocol_limits.py)


@pytest.mark.parametrize("template", ["%s", " %s", "\t%s", "%s ", "%s\t", " \t%s\t "])
async def test_spaces_and_tabs_around_the_key_are_ignored(client: AsyncTestClient, template: str) -> None:  # type: ignore[type-arg]
    for key in (CLIENT_KEY, ADMIN_KEY):
        r = await client.get("/limits", headers={"X-API-Key": template % key})
        assert r.status_code == 200, (template, key)
    r = await client.get("/usage/keys", headers={"X-API-Key": template % ADMIN_KEY})
    assert r.status_code == 200  # an admin key is still an admin key


@pytest.mark.parametrize("value", ["", " ", "\t \t", f"{CLIENT_KEY[:5]} {CLIENT_KEY[5:]}", f"{CLIENT_KEY}\n"])
async def test_whitespace_alone_or_inside_is_no_key(client: AsyncTestClient, value: str) -> None:  # type: ignore[type-arg]
    r = await client.get("/limits", headers={"X-API-Key": value})
    assert r.status_code == 403


# OpenAPI pages without internet

EXTERNAL = re.compile(rb"(?i)(?:https?:)?//[a-z0-9-]+(?:\.[a-z0-9-]+)+")
REFERENCES = re.compile(rb"""(?i)(?:src|href)\s*=\s*["']([^"']+)["']|url\(\s*["']?([^"')]+)""")


async def test_the_schema_pages_load_nothing_from_outside(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    paths = sorted(
        {route.path for route in client.app.routes if route.path.startswith("/schema") and "{" not in route.path}
    )
    assert "/schema" in paths and "/schema/swagger" in paths, paths
    pages = 0
    for path in paths:
        r = await client.get(path, headers=KEY)
        assert r.status_code == 200, (path, r.status_code)
        if not r.headers["content-type"].startswith("text/html"):
            continue
        pages += 1
        assert b"http://" not in r.content and b"https://" not in r.content, (path, EXTERNAL.findall(r.content))
        references = [a or b for a, b in REFERENCES.findall(r.content)]
        assert references, path  # the page loads its script and style ...
        for reference in references:
            assert reference.startswith(b"/") and not reference.startswith(b"//"), (path, reference)
            asset = await client.get(reference.decode(), headers=KEY)  # ... from this server
            assert asset.status_code == 200, (path, reference, asset.status_code)
            assert len(asset.content) > 100, reference
            if reference.endswith(b".css"):
                assert asset.headers["content-type"].startswith("text/css")
                css_urls = [a or b for a, b in REFERENCES.findall(asset.content)]
                assert not [u for u in css_urls if EXTERNAL.match(u)], css_urls
            if reference.endswith(b".js"):
                assert "javascript" in asset.headers["content-type"]
    assert pages >= 2, paths


async def test_the_swagger_page_embeds_the_schema(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.get("/schema/swagger", headers=KEY)
    assert b"SwaggerUIBundle(" in r.content
    assert b'"/operations/summarize"' in r.content
    assert (await client.get("/schema/openapi.json", headers=KEY)).status_code == 200


@pytest.mark.parametrize("path", ["/schema/redoc", "/schema/elements", "/schema/rapidoc"])
async def test_pages_that_need_a_cdn_are_gone(client: AsyncTestClient, path: str) -> None:  # type: ignore[type-arg]
    assert (await client.get(path, headers=KEY)).status_code == 404


@pytest.mark.parametrize(
    "path", ["/schema/static/../../etc/passwd", "/schema/static/swagger-editor-bundle.js", "/schema/static/nope.js"]
)
async def test_only_the_pages_assets_are_served(client: AsyncTestClient, path: str) -> None:  # type: ignore[type-arg]
    assert (await client.get(path, headers=KEY)).status_code == 404


async def test_the_assets_need_a_key_like_every_page(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    r = await client.get("/schema/swagger", headers=KEY)
    for reference in [a or b for a, b in REFERENCES.findall(r.content)]:
        assert (await client.get(reference.decode())).status_code == 403
