"""Self-tests (issue 12 #3): ``ai-platform selftest`` and the admin-only ``GET /health?deep=true``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ai_platform_sentiment
import msgspec
import pytest

import ai_platform_classify
import ai_platform_summarize
import ai_platform_translate
from ai_platform import Choose, Limits, Message, Operation, ResponseMeta
from ai_platform.errors import ConfigurationError
from ai_platform.evaluation.selftest import selftest
from ai_platform.operations import Example
from ai_platform.settings import Settings
from ai_platform.testing import ADMIN_HEADERS, CLIENT_HEADERS, FakeEngine

CLI = str(Path(sys.executable).parent / "ai-platform")
BUILT_IN = (
    ("summarize", ai_platform_summarize),
    ("translate", ai_platform_translate),
    ("classify", ai_platform_classify),
)


class PickRequest(msgspec.Struct, kw_only=True):
    text: str


class PickResponse(msgspec.Struct, kw_only=True):
    label: str
    meta: ResponseMeta


def pick(respond_label: str | None = None, examples: tuple[Example, ...] | None = None) -> Operation:
    """A Choose operation whose respond may answer a label that was not among the options."""
    return Operation(
        name="pick",
        summary="test",
        request_type=PickRequest,
        response_type=PickResponse,
        limits=Limits(max_input_chars=100, max_output_tokens=4),
        prompt=lambda r: Choose(messages=[Message("user", r.text)], options=["yes", "no"]),
        respond=lambda r, result, meta: PickResponse(label=respond_label or result.best, meta=meta),
        examples=(Example(request={"text": "yes"}, expected={"label": "yes"}),) if examples is None else examples,
    )


@pytest.mark.anyio
async def test_selftest_passes_fails_and_skips() -> None:
    operations = {name: module.OPERATION for name, module in BUILT_IN}
    engine = FakeEngine(models=dict.fromkeys(operations, "m"))
    results = await selftest(operations, engine)
    assert [(r.operation, r.result) for r in results] == [(name, "pass") for name in operations]
    assert all(r.latency_ms is not None and r.error is None and r.example for r in results)

    [result] = await selftest({"pick": pick("maybe")}, FakeEngine(models={"pick": "m"}))
    assert result.result == "fail" and result.error == "label='maybe' is not one of the options offered"
    [result] = await selftest({"pick": pick(examples=())}, FakeEngine(models={"pick": "m"}))
    assert result.result == "skipped" and result.passed
    [result] = await selftest({"pick": pick()}, FakeEngine(models={"pick": "m"}, fail_with=RuntimeError("boom")))
    assert result.result == "fail" and result.error == "RuntimeError: boom"
    [result] = await selftest({"pick": pick()}, FakeEngine(models={"pick": "m"}, unavailable={"pick"}))
    assert result.result == "fail" and result.error == "model not loaded: missing"


@pytest.mark.anyio
async def test_selftest_has_a_deadline() -> None:
    engine = FakeEngine(models={"pick": "m"}, delay=5)
    [result] = await selftest({"pick": pick()}, engine, timeout=0.2)
    assert result.result == "fail" and result.error == "no answer within 0.2 s"


def selftest_env(tmp_path: Path, models_dir: Path, model: str) -> dict[str, str]:
    """Plugin and model settings only, in a folder without ``.env``: no SECRET_KEY, no keys, no database."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "MODELS_DIR": str(models_dir),
        "DEFAULT_MODEL": model, "OPERATION_MODEL_MAP": "{}", "ENABLED_PLUGINS": "summarize,translate,classify,sentiment",
    }  # fmt: skip


def test_model_commands_read_only_plugin_and_model_settings(tmp_path: Path) -> None:
    """eval and selftest serve no HTTP: they read the plugin and model settings (``Settings.for_models``), and
    neither need nor check keys, which ``serve``'s settings require."""
    (tmp_path / ".env").write_text("SECRET_KEY=change-me\nMODELS_DIR=/srv/models\nDATABASE_URL=mysql://x\n")
    env = {"DEFAULT_MODEL": "m", "MAX_BATCH_PER_MODEL": "4", "EXECUTION_PROVIDER": "cpu"}
    with pytest.raises(ConfigurationError):
        Settings.from_env(env, env_file=tmp_path / ".env")
    settings = Settings.for_models(env, env_file=tmp_path / ".env")
    assert settings.models_dir == Path("/srv/models") and settings.default_model == "m"
    assert settings.max_batch_per_model == 4 and settings.execution_provider == "cpu"
    assert settings.database_url == Settings.for_models({}, env_file=None).database_url  # not read: its default
    assert settings.secret_key != Settings.for_models({}, env_file=None).secret_key  # random, known to nobody
    assert Settings.for_models({}, env_file=None).admin_api_keys == []
    with pytest.raises(ConfigurationError, match="MAX_QUEUE_PER_MODEL"):  # what it reads is still checked
        Settings.for_models({"MAX_QUEUE_PER_MODEL": "0"}, env_file=None)


def test_selftest_command_on_the_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = selftest_env(tmp_path, tiny_model_dir.parent, tiny_model_dir.name)
    result = subprocess.run([CLI, "selftest"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["OPERATION", "MODEL", "RESULT", "LATENCY", "MS", "ERROR"]
    rows = {line.split()[0]: line.split() for line in lines[1:5]}
    assert set(rows) == {"summarize", "translate", "classify", "sentiment"}  # the third-party plugin too
    assert all(row[1] == tiny_model_dir.name and row[2] == "PASS" and float(row[3]) > 0 for row in rows.values())
    assert lines[-1] == "selftest: passed"

    result = subprocess.run(
        [CLI, "selftest", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    body = json.loads(result.stdout)
    assert result.returncode == 0 and body["passed"] is True and body["failed_plugins"] == []
    assert {o["operation"]: o["result"] for o in body["operations"]} == dict.fromkeys(rows, "pass")


def test_selftest_command_fails_when_a_model_is_missing(tmp_path: Path) -> None:
    env = selftest_env(tmp_path, tmp_path / "models", "missing-model")
    result = subprocess.run([CLI, "selftest"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "model not loaded: model folder not found" in result.stdout
    assert result.stdout.splitlines()[-1] == "selftest: FAILED"


# --- GET /health?deep=true ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_deep_health_is_admin_only_and_runs_every_operation(platform_client: Any) -> None:
    engine = FakeEngine(models={name: "m" for name, _ in BUILT_IN})
    async with platform_client(*BUILT_IN, engine=engine) as client:
        plain = (await client.get("/health")).json()
        assert "selftest" not in plain
        for headers in ({}, CLIENT_HEADERS, {"X-API-Key": "wrong"}):
            r = await client.get("/health?deep=true", headers=headers)
            assert r.status_code == 403, r.text
            assert r.json() == {"detail": "This action requires an admin API key."}
        assert "selftest" not in (await client.get("/health?deep=false", headers=ADMIN_HEADERS)).json()
        r = await client.get("/health?deep=true", headers=ADMIN_HEADERS)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "healthy" and "database" in body  # the admin view, and the self-tests
        assert [(c["operation"], c["result"]) for c in body["selftest"]] == [(n, "pass") for n, _ in BUILT_IN]
        assert all(c["latency_ms"] >= 0 and c["model"] == "m" and c["error"] is None for c in body["selftest"])
        usage = (await client.get("/limits/usage", headers=CLIENT_HEADERS)).json()["usage"]
        assert all(u["request_count"] == 0 for u in usage)  # self-tests are not counted

        engine.fail_with = RuntimeError("boom")
        body = (await client.get("/health?deep=true", headers=ADMIN_HEADERS)).json()
        assert body["status"] == "degraded"
        assert {c["result"] for c in body["selftest"]} == {"fail"}
        assert body["selftest"][0]["error"] == "RuntimeError: boom"


@pytest.mark.anyio
async def test_deep_health_on_the_tiny_model(platform_client: Any, tiny_model_dir: Path) -> None:
    plugins = (*BUILT_IN, ("sentiment", ai_platform_sentiment))
    settings = {"OPERATION_MODEL_MAP": "{}"}  # every operation on DEFAULT_MODEL: the tiny model
    async with platform_client(*plugins, model_dir=tiny_model_dir, settings=settings) as client:
        r = await client.get("/health?deep=true", headers=ADMIN_HEADERS)
        assert r.status_code == 200, r.text
        checks = {c["operation"]: c for c in r.json()["selftest"]}
        assert set(checks) == {"summarize", "translate", "classify", "sentiment"}
        assert all(c["result"] == "pass" and c["model"] == tiny_model_dir.name for c in checks.values()), checks
