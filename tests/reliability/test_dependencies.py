"""Schema migrations in place, and failing dependencies: an unreachable or locked database, a corrupt model."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from datetime import date
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient
from tortoise import Tortoise, connections
from tortoise.migrations.executor import MigrationExecutor

from ai_platform.app import create_app
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from ai_platform.usage.database import APPS, BASELINE, MODELS_MODULE, Database
from ai_platform.usage.models import DailyUsage, KeyQuota
from harness import PostgresServer, query
from support import ADMIN, CLASSIFY, KEY, SEED_MODELS, SUMMARIZE, TRANSLATE

pytestmark = pytest.mark.anyio


async def _make_legacy(url: str) -> None:
    """A database as the first release left it: its tables from ``generate_schemas``, no migration history."""
    await Tortoise.init(db_url=url, modules={"models": [MODELS_MODULE]})
    client = connections.get("default")
    await MigrationExecutor(client, APPS).migrate([BASELINE])
    await client.execute_script(
        "INSERT INTO daily_usage (operation, day, request_count, total_tokens) VALUES ('summarize', '2026-02-03', 7, 70);"
        "DROP TABLE tortoise_migrations;"
    )
    await Tortoise.close_connections()


async def test_migrations_upgrade_an_existing_database_in_place(database_url: str) -> None:
    await _make_legacy(database_url)
    for _ in range(2):  # the second start finds nothing to do
        async with Database(database_url).opened():
            row = await DailyUsage.get(operation="summarize", day=date(2026, 2, 3))
            assert (row.request_count, row.total_tokens) == (7, 70)
            await KeyQuota.update_or_create(defaults={"daily_limit": 3}, key_id="abc", operation="summarize")
    applied = query(database_url, "SELECT name FROM tortoise_migrations ORDER BY name")
    assert applied == [("0001_initial",), ("0002_quotas_and_reservations",)]


async def _eventually_ok(client: AsyncTestClient, seconds: float = 20) -> None:  # type: ignore[type-arg]
    async with asyncio.timeout(seconds):
        while (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code != 200:
            await asyncio.sleep(0.2)


async def test_postgres_going_away_is_503_then_recovers(env: dict[str, str], postgres: PostgresServer) -> None:
    settings = Settings.from_mapping({**env, "DATABASE_URL": postgres.new_database()})
    async with AsyncTestClient(create_app(settings, engine=FakeEngine(models=dict(SEED_MODELS)))) as client:
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
        postgres.stop()
        try:
            for path in ("/operations/summarize", "/operations/classify"):
                r = await client.post(path, json=SUMMARIZE if "summ" in path else CLASSIFY, headers=KEY)
                assert r.status_code == 503, r.text
                assert r.json() == {"detail": "The usage database is unavailable; try again shortly."}
                assert r.headers["Retry-After"] == "5"
            assert (await client.get("/limits/usage", headers=KEY)).status_code == 503
            assert (await client.get("/health")).status_code == 200  # the process is alive and says so
        finally:
            postgres.start()
        await _eventually_ok(client)
        usage = {
            u["operation"]: u["request_count"] for u in (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        }
        assert usage == {"summarize": 2, "translate": 0, "classify": 0}  # the refused requests left no trace


async def test_a_locked_sqlite_database_is_503_then_recovers(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    settings = Settings.from_mapping({**env, "DATABASE_URL": f"sqlite://{path}?busy_timeout=200"})
    async with AsyncTestClient(create_app(settings, engine=FakeEngine(models=dict(SEED_MODELS)))) as client:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # another process holding the write lock too long
        try:
            r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
            assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await _eventually_ok(client)


async def test_a_corrupt_model_is_503_for_its_operation_only(env: dict[str, str], tiny_model_dir: Path) -> None:
    models = Path(env["MODELS_DIR"])
    models.mkdir()
    shutil.copytree(tiny_model_dir, models / "qwen-translate")
    (models / "qwen-translate" / "model.onnx").write_bytes(b"\x00not an onnx model" * 100)
    for folder in ("qwen-summarize", "qwen-classify"):
        (models / folder).symlink_to(tiny_model_dir, target_is_directory=True)
    async with AsyncTestClient(create_app(Settings.from_mapping(env))) as client:
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert r.status_code == 503 and "qwen-translate" in r.json()["detail"], r.text
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
        assert (await client.post("/operations/classify", json=CLASSIFY, headers=KEY)).status_code == 200
        health = (await client.get("/health", headers=ADMIN)).json()
        assert health["status"] == "degraded"
        translate = next(m for m in health["models"] if m["name"].startswith("translate"))
        assert translate["loaded"] is False and translate["error"]
