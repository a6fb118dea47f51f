"""``/health``: public as the seed shows it, details for admins only, HEAD for load balancers (issue 11 #17).

Without a key (or with a client key), ``/health`` shows what the seed guide's example shows: status,
uptime, memory, CPU, each operation's model (name, loaded, path) and the time. Load errors, providers,
failed plugins and the usage database's error text are internals: only an admin key sees them. A
model that failed to load answers operations 503 with a generic message, never its load error.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from ai_platform import hookimpl
from ai_platform.app import create_app
from ai_platform.plugins import load_plugins
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from support import ADMIN, KEY, SEED_MODELS, SUMMARIZE, TRANSLATE, free_port

pytestmark = pytest.mark.anyio

# The seed guide's /health example, field for field.
SEED_FIELDS = {"status", "uptime_seconds", "memory_used_mb", "memory_total_mb", "cpu_percent", "models", "timestamp"}
SEED_MODEL_FIELDS = {"name", "loaded", "path"}
ADMIN_FIELDS = SEED_FIELDS | {"process_rss_mb", "failed_plugins", "database"}
ADMIN_MODEL_FIELDS = SEED_MODEL_FIELDS | {"provider", "error", "precision", "agreement"}


def broken_plugin() -> tuple[str, object]:
    module = types.ModuleType("broken")

    @hookimpl
    def register_operations() -> list[object]:
        raise ZeroDivisionError("internal detail of a broken plugin")

    module.register_operations = register_operations  # type: ignore[attr-defined]
    return "broken", module


@pytest.fixture
def troubled_app(env: dict[str, str], tmp_path: Path) -> object:
    """One model missing, one plugin broken, and a database whose folder is a file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the database's folder should be")
    settings = Settings.from_mapping({**env, "DATABASE_URL": f"sqlite://{blocker / 'usage.sqlite3'}"})
    plugins = load_plugins(enabled=[*SEED_MODELS, "broken"], extra_plugins=[broken_plugin()])
    engine = FakeEngine(models=dict(SEED_MODELS), unavailable={"translate"})
    return create_app(settings, plugins=plugins, engine=engine)


@pytest.mark.parametrize("headers", [{}, KEY, {"X-API-Key": "wrong-key-0123456789"}], ids=["none", "client", "wrong"])
async def test_public_health_shows_only_what_the_seed_shows(troubled_app: object, headers: dict[str, str]) -> None:
    async with AsyncTestClient(troubled_app) as client:  # type: ignore[arg-type]
        r = await client.get("/health", headers=headers)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == SEED_FIELDS, body
    assert body["status"] == "degraded"
    assert all(set(model) == SEED_MODEL_FIELDS for model in body["models"]), body
    for secret in ("missing", "internal detail", "ZeroDivisionError", "FileExistsError", "CPUExecutionProvider"):
        assert secret not in r.text, r.text


@pytest.mark.parametrize("header", ["x-api-key", "bearer"])
async def test_admin_health_shows_the_details(troubled_app: object, header: str) -> None:
    # An admin key counts in either header the API accepts (issue 13: Bearer everywhere).
    key = ADMIN["X-API-Key"]
    headers = ADMIN if header == "x-api-key" else {"Authorization": f"Bearer {key}"}
    async with AsyncTestClient(troubled_app) as client:  # type: ignore[arg-type]
        r = await client.get("/health", headers=headers)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == ADMIN_FIELDS, body
    assert all(set(model) == ADMIN_MODEL_FIELDS for model in body["models"]), body
    models = {m["name"]: m for m in body["models"]}
    assert models["translate (qwen-translate)"]["error"] == "missing"
    assert models["summarize (qwen-summarize)"]["provider"] == "CPUExecutionProvider"
    assert models["summarize (qwen-summarize)"]["precision"] is None  # no export.json at the fake engine's path
    assert models["summarize (qwen-summarize)"]["agreement"] is None
    assert [p["name"] for p in body["failed_plugins"]] == ["broken"]
    assert "internal detail of a broken plugin" in body["failed_plugins"][0]["error"]
    assert body["database"]["available"] is False and body["database"]["error"].startswith("FileExistsError: ")


async def test_head_health_answers_200_without_a_body(env: dict[str, str]) -> None:
    """Load balancers probe with HEAD."""
    app = create_app(Settings.from_mapping(env), engine=FakeEngine(models=dict(SEED_MODELS)))
    async with AsyncTestClient(app) as client:
        for headers in ({}, ADMIN):
            r = await client.head("/health", headers=headers)
            assert (r.status_code, r.content) == (200, b""), r.text


def test_head_health_over_a_real_server(env: dict[str, str], tmp_path: Path) -> None:
    """Through uvicorn too (what a load balancer talks to): 200, no body, the connection stays usable."""
    import http.client
    import os
    import subprocess
    import sys
    import time

    port = free_port()
    variables = {**os.environ, **env, "ENABLED_PLUGINS": "summarize,translate,classify", "MODEL_ISOLATION": "thread"}
    cli = Path(sys.executable).parent / "ai-platform"
    server = subprocess.Popen([str(cli), "serve", "--port", str(port)], env=variables, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("HEAD", "/health")
                response = connection.getresponse()
                break
            except OSError:
                connection.close()
                assert server.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        try:
            assert response.status == 200 and response.read() == b""
            connection.request("GET", "/health")  # same connection: the HEAD left nothing behind on it
            follow = connection.getresponse()
            assert follow.status == 200 and b'"status"' in follow.read()
        finally:
            connection.close()
    finally:
        server.terminate()
        server.wait(timeout=60)


async def test_a_model_load_error_stays_out_of_the_503(env: dict[str, str], tiny_model_dir: Path) -> None:
    """The runtime's own message carried the load error (onnxruntime's provider list) to any client."""
    models = Path(env["MODELS_DIR"])
    models.mkdir()
    (models / "qwen-summarize").symlink_to(tiny_model_dir, target_is_directory=True)
    settings = Settings.from_mapping(
        {**env, "EXECUTION_PROVIDER": "cuda", "MODEL_ISOLATION": "thread", "ENABLED_PLUGINS": "summarize,translate"}
    )
    async with AsyncTestClient(create_app(settings)) as client:
        health = (await client.get("/health", headers=ADMIN)).json()
        errors = {m["name"]: m["error"] for m in health["models"]}
        assert "CUDAExecutionProvider" in errors["summarize (qwen-summarize)"]  # the admin sees why
        assert errors["translate (qwen-translate)"] == "model folder not found"
        for operation, body, model in (
            ("summarize", SUMMARIZE, "qwen-summarize"),
            ("translate", TRANSLATE, "qwen-translate"),
        ):
            r = await client.post(f"/operations/{operation}", json=body, headers=KEY)
            assert r.status_code == 503 and "Retry-After" in r.headers
            assert r.json() == {
                "detail": f"Model '{model}' for operation '{operation}' is not available; retry later."
            }, r.text


async def test_admin_health_shows_each_models_precision_and_recorded_agreement(
    env: dict[str, str], tiny_model_dir: Path
) -> None:
    """What the export measured against the fp32 source (issue 12), read from the folder's export.json."""
    models = Path(env["MODELS_DIR"])
    models.mkdir()
    (models / "qwen-summarize").symlink_to(tiny_model_dir, target_is_directory=True)
    settings = Settings.from_mapping({**env, "MODEL_ISOLATION": "thread", "ENABLED_PLUGINS": "summarize,translate"})
    recorded = json.loads((tiny_model_dir / "export.json").read_text())["agreement"]
    async with AsyncTestClient(create_app(settings)) as client:
        admin = {m["name"]: m for m in (await client.get("/health", headers=ADMIN)).json()["models"]}
        public = (await client.get("/health", headers=KEY)).json()["models"]
    served = admin["summarize (qwen-summarize)"]
    assert served["loaded"] is True and served["precision"] == "fp32"
    assert served["agreement"] == {
        "top1": recorded["top1"],
        "mean_kl": recorded["mean_kl"],
        "positions": recorded["positions"],
        "passed": True,
        "min_top1": recorded["min_top1"],
        "max_mean_kl": recorded["max_mean_kl"],
    }
    assert served["agreement"]["top1"] == 1.0 and served["agreement"]["positions"] >= 256
    missing = admin["translate (qwen-translate)"]
    assert (missing["precision"], missing["agreement"]) == (None, None)  # no folder, nothing recorded
    assert all(set(model) == SEED_MODEL_FIELDS for model in public)  # a client key sees none of it
