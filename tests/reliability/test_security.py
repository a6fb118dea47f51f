"""Security: keys on every route, admin-only actions, no key in logs or the audit trail, private files."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from harness import query
from log_checks import FORGING_PATHS, assert_one_record_per_line, audit_lines
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


# Issue 11, items 5-7: client-controlled values in the log, requests no route matches, secrets in URLs.


def audit_rows(env: dict[str, str], count: int) -> list[sqlite3.Row]:
    """The first ``count`` audit rows, once written (they are written in batches, within 0.1 s)."""
    db = sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite://"))
    db.row_factory = sqlite3.Row
    try:
        for _ in range(100):
            rows = db.execute("SELECT * FROM audit_record ORDER BY id").fetchall()
            if len(rows) >= count:
                return rows
            time.sleep(0.05)
        return rows
    finally:
        db.close()


async def test_client_controlled_values_cannot_forge_log_lines(env: dict[str, str]) -> None:
    async with AsyncTestClient(
        create_app(Settings.from_mapping(env), engine=FakeEngine(models=dict(SEED_MODELS)))
    ) as client:
        for path in FORGING_PATHS:
            r = await client.post(path, json=SUMMARIZE, headers={})
            assert r.status_code in (403, 404), (path, r.status_code)
        served = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
        assert served.status_code == 200
    audit = audit_lines(assert_one_record_per_line((Path(env["LOG_DIR"]) / "platform.log").read_bytes()))
    # One line per request; the path as the client sent it (percent-encoded), so no field can be forged either.
    assert [unquote(m["path"]) for m in audit] == [unquote(p) for p in [*FORGING_PATHS, "/operations/summarize"]]
    assert all(m["path"].isascii() and m["path"].isprintable() for m in audit)
    assert [m["status"] for m in audit][-1] == "200"
    # The rows hold the same escaped path as the lines (printable: safe to print on a terminal).
    rows = audit_rows(env, len(audit))
    assert [r["path"] for r in rows] == [m["path"] for m in audit]


async def test_unmatched_paths_and_wrong_methods_are_audited(env: dict[str, str]) -> None:
    long_path = "/" + "a" * 300 + "%0a" + "b" * 5000
    requests = [
        ("GET", "/", KEY),
        ("HEAD", "/health", {}),  # 405, or 200 once /health answers HEAD: either way, audited
        ("TRACE", "/health", {}),
        ("PATCH", "/limits", KEY),
        ("DELETE", "/operations/summarize", {}),
        ("GET", long_path, {}),
        ("MKCALENDAR", "/limits", KEY),  # longer than the column's 8 characters
        ("GET", "/health", {}),
    ]
    async with AsyncTestClient(
        create_app(Settings.from_mapping(env), engine=FakeEngine(models=dict(SEED_MODELS)))
    ) as client:
        statuses = [
            (await client.request(method, path, headers=headers)).status_code for method, path, headers in requests
        ]
    assert statuses[0] == 404 and statuses[2:7] == [405, 405, 405, 404, 405] and statuses[7] == 200
    rows = audit_rows(env, len(requests))
    assert [(r["method"], r["status"]) for r in rows] == [
        (method[:8], status) for (method, _, _), status in zip(requests, statuses, strict=True)
    ]
    assert [r["path"] for r in rows][:5] == ["/", "/health", "/health", "/limits", "/operations/summarize"]
    capped = rows[5]["path"]
    assert len(capped) == 256 and capped.startswith("/" + "a" * 254)
    # The caller's key id where it sent a valid key, though no route (and so no authentication) ran.
    assert rows[0]["key_id"] and rows[0]["key_id"] == rows[3]["key_id"] and rows[1]["key_id"] is None
    assert all(r["operation"] is None and r["output_tokens"] == 0 for r in rows)
    log = (Path(env["LOG_DIR"]) / "platform.log").read_bytes()
    audit = audit_lines(assert_one_record_per_line(log))
    assert [(m["method"], m["path"], int(m["status"])) for m in audit] == [
        (r["method"], r["path"], r["status"]) for r in rows
    ]


async def test_audit_rows_of_odd_requests_fit_their_columns(env: dict[str, str], database_url: str) -> None:
    """PostgreSQL refuses a value longer than its column, and with it the whole batch of rows: each is cut to fit."""
    settings = Settings.from_mapping({**env, "DATABASE_URL": database_url})
    requests = [
        ("MKCALENDAR", "/limits"),
        ("GET", "/" + "\u00e9" * 400),
        ("GET", "/x" + "%0a" * 300),
        ("GET", "/health"),
    ]
    async with AsyncTestClient(create_app(settings, engine=FakeEngine(models=dict(SEED_MODELS)))) as client:
        statuses = [(await client.request(method, path, headers=KEY)).status_code for method, path in requests]
    assert statuses == [405, 404, 404, 200]
    rows = query(database_url, "SELECT method, path, status FROM audit_record ORDER BY id")  # written at shutdown
    assert [(method, status) for method, _, status in rows] == [
        ("MKCALEND", 405),
        ("GET", 404),
        ("GET", 404),
        ("GET", 200),
    ]
    paths = [str(path) for _, path, _ in rows]
    assert paths[0] == "/limits" and paths[3] == "/health"
    # Whole characters (each é is %C3%A9), then the mark of the cut.
    assert paths[1] == "/" + "%C3%A9" * 42 + "\u2026" and unquote(paths[1][:-1]) == "/" + "\u00e9" * 42
    assert paths[2] == "/x" + "%0A" * 84 + "\u2026"
