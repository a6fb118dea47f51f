"""Security: keys on every route, admin-only actions, no key in logs or the audit trail, private files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from support import ADMIN, ADMIN_KEY, CLIENT_KEY, KEY, SEED_MODELS, SUMMARIZE

pytestmark = pytest.mark.anyio

WRONG_KEY = "wrong-key-that-looks-plausible-0123"


async def test_every_route_but_health_refuses_missing_and_wrong_keys(env: dict[str, str]) -> None:
    async with AsyncTestClient(
        create_app(Settings.from_mapping(env), engine=FakeEngine(models=dict(SEED_MODELS)))
    ) as client:
        paths = (await client.get("/schema/openapi.json", headers=KEY)).json()["paths"]
        routes = [(m.upper(), re.sub(r"\{[^}]+\}", "x", p)) for p, ms in paths.items() for m in ms if m != "parameters"]
        routes += [("GET", "/schema/openapi.json"), ("GET", "/schema"), ("POST", "/operations/nope")]
        assert ("DELETE", "/quotas/x/x") in routes and len(routes) > 10
        for method, path in routes:
            for headers in ({}, {"X-API-Key": WRONG_KEY}, {"X-API-Key": ""}):
                r = await client.request(method, path, headers=headers, json={})
                expected = 200 if path == "/health" else 403
                assert r.status_code == expected, (method, path, headers, r.status_code)


async def test_client_keys_cannot_change_limits_or_read_other_keys(env: dict[str, str]) -> None:
    async with AsyncTestClient(
        create_app(Settings.from_mapping(env), engine=FakeEngine(models=dict(SEED_MODELS)))
    ) as client:
        me = (await client.get("/usage/keys/me", headers=KEY)).json()["usage"][0]["key_id"]
        admin_id = (await client.get("/usage/keys/me", headers=ADMIN)).json()["usage"][0]["key_id"]
        refused = [
            ("PUT", "/limits", {"operation": "summarize", "daily_limit": 5}),
            ("PUT", "/quotas", {"key_id": me, "operation": "summarize", "daily_limit": 5}),
            ("GET", "/quotas", None),
            ("DELETE", f"/quotas/{me}/summarize", None),
            ("GET", "/usage/keys", None),
            ("GET", f"/usage/keys?key_id={admin_id}", None),
        ]
        for method, path, body in refused:
            r = await client.request(method, path, headers=KEY, json=body)
            assert (r.status_code, r.json()) == (403, {"detail": "This action requires an admin API key."}), path
        mine = (await client.get("/usage/keys/me", headers=KEY)).json()["usage"]
        assert {u["key_id"] for u in mine} == {me}  # only its own rows
        assert (await client.get("/limits", headers=KEY)).json()["limits"][0]["daily_limit"] == 1000


async def test_keys_never_reach_logs_audit_trail_or_database(env: dict[str, str], tmp_path: Path) -> None:
    async with AsyncTestClient(
        create_app(Settings.from_mapping(env), engine=FakeEngine(models=dict(SEED_MODELS)))
    ) as client:
        me = (await client.get("/usage/keys/me", headers=KEY)).json()["usage"][0]["key_id"]
        await client.put("/quotas", headers=ADMIN, json={"key_id": me, "operation": "summarize", "daily_limit": 1})
        for headers in (KEY, KEY, ADMIN, {"X-API-Key": WRONG_KEY}):
            await client.post("/operations/summarize", json=SUMMARIZE, headers=headers)
        await client.get("/usage/keys", headers=ADMIN)
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert me.encode() in written  # the key id is what identifies callers
    for secret in (CLIENT_KEY, ADMIN_KEY, WRONG_KEY, env["SECRET_KEY"]):
        assert secret.encode() not in written, secret


async def test_database_files_are_private(env: dict[str, str], tmp_path: Path) -> None:
    async with AsyncTestClient(
        create_app(Settings.from_mapping(env), engine=FakeEngine(models=dict(SEED_MODELS)))
    ) as client:
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
        files = list(tmp_path.glob("usage.sqlite3*"))
        assert {f.name for f in files} >= {"usage.sqlite3", "usage.sqlite3-wal", "usage.sqlite3.migrate-lock"}
        assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}
