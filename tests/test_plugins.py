"""Plugin discovery, admin control, validation and isolation of broken plugins."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from ai_platform import Limits, hookimpl
from ai_platform.app import create_app
from ai_platform.errors import ConfigurationError, PluginError
from ai_platform.plugins import ENTRY_POINT_GROUP, load_plugins
from ai_platform.settings import Settings
from fakes import FakeEngine
from support import CLIENT_KEY

BUILT_INS = {"summarize", "translate", "classify"}


def plugin(name: str, *operations: object) -> tuple[str, object]:
    """An in-process plugin module whose hook returns ``operations``."""
    module = types.ModuleType(name)

    @hookimpl
    def register_operations() -> list[object]:
        return list(operations)

    module.register_operations = register_operations  # type: ignore[attr-defined]
    return name, module


def renamed(name: str) -> object:
    from ai_platform_summarize import OPERATION

    return dataclasses.replace(OPERATION, name=name)


def test_built_ins_are_found_through_entry_points() -> None:
    loaded = load_plugins()
    by_name = {p.name: p for p in loaded.plugins}
    assert set(by_name) >= BUILT_INS
    for name in BUILT_INS:
        info = by_name[name]
        assert (info.status, info.operations, info.hooks) == ("loaded", [name], ["register_operations"])
        assert info.distribution == f"ai-platform-{name}" and info.version == "0.1.0"
    assert set(loaded.operations) >= BUILT_INS


def test_enabled_and_disabled_plugins() -> None:
    loaded = load_plugins(enabled=["summarize", "classify"], disabled=["classify"])
    status = {p.name: p.status for p in loaded.plugins if p.name in BUILT_INS}
    assert status == {"summarize": "loaded", "translate": "disabled", "classify": "disabled"}
    assert set(loaded.operations) == {"summarize"}
    assert loaded.manager.is_blocked("translate")


@pytest.mark.parametrize(
    ("source", "error"),
    [
        (EntryPoint("ghost", "no_such_module_xyz", ENTRY_POINT_GROUP), "ModuleNotFoundError"),
        (plugin("raises", ZeroDivisionError)[1], "register_operations returned type"),
        (plugin("bad_limit", dataclasses.replace(renamed("ok_name"), limits=Limits(max_input_chars=0, max_output_tokens=5)))[1],
         "limit max_input_chars must be a positive integer"),
        (plugin("bad_name", renamed("Bad-Name"))[1], "must match"),
        (plugin("dup", renamed("summarize"))[1], "already provided by plugin 'summarize'"),
        (plugin("not_struct", dataclasses.replace(renamed("nostruct"), request_type=dict))[1], "msgspec.Struct"),
    ],
)  # fmt: skip
def test_broken_plugins_are_isolated_and_reported(source: object, error: str) -> None:
    loaded = load_plugins(extra_plugins=[("broken", source)])
    broken = next(p for p in loaded.plugins if p.name == "broken")
    assert broken.status == "failed" and error in (broken.error or "")
    assert set(loaded.operations) >= BUILT_INS  # the others still serve
    assert loaded.manager.get_plugin("broken") is None
    with pytest.raises(PluginError, match="plugin 'broken' failed"):
        load_plugins(extra_plugins=[("broken", source)], strict=True)


def test_hook_that_raises_is_isolated() -> None:
    module = types.ModuleType("boom")

    @hookimpl
    def register_operations() -> list[object]:
        raise RuntimeError("kaput")

    module.register_operations = register_operations  # type: ignore[attr-defined]
    loaded = load_plugins(extra_plugins=[("boom", module)], use_entry_points=False)
    assert loaded.plugins[0].status == "failed" and loaded.plugins[0].error == "RuntimeError: kaput"


def test_misspelt_hook_fails_check_pending() -> None:
    module = types.ModuleType("typo")

    @hookimpl
    def register_operation() -> list[object]:  # missing "s": no such hookspec
        return []

    module.register_operation = register_operation  # type: ignore[attr-defined]
    loaded = load_plugins(extra_plugins=[("typo", module)], use_entry_points=False)
    assert loaded.plugins[0].status == "failed"
    assert "unknown hook 'register_operation'" in (loaded.plugins[0].error or "")


@pytest.mark.anyio
async def test_disabled_plugin_has_no_route_and_failed_plugin_shows_in_health(env: dict[str, str]) -> None:
    settings = Settings.from_mapping({**env, "DISABLED_PLUGINS": "translate"})
    plugins = load_plugins(disabled=settings.disabled_plugins, extra_plugins=[plugin("broken", ZeroDivisionError)])
    app = create_app(settings, plugins=plugins, engine=FakeEngine())
    async with AsyncTestClient(app) as client:
        r = await client.post("/operations/translate", json={"text": "x"}, headers={"X-API-Key": CLIENT_KEY})
        assert r.status_code == 404
        limits = (await client.get("/limits", headers={"X-API-Key": CLIENT_KEY})).json()["limits"]
        assert "translate" not in {x["operation"] for x in limits}
        health = (await client.get("/health")).json()
        assert health["status"] == "degraded"
        assert [p["name"] for p in health["failed_plugins"]] == ["broken"]


def test_operation_without_a_model_is_reported(env: dict[str, str]) -> None:
    settings = Settings.from_mapping(env)  # seed map: no entry for "extra", no DEFAULT_MODEL
    plugins = load_plugins(extra_plugins=[plugin("extra", renamed("extra"))])
    create_app(settings, plugins=plugins, engine=FakeEngine())
    assert "extra" not in plugins.operations
    assert "OPERATION_MODEL_MAP" in (next(p for p in plugins.plugins if p.name == "extra").error or "")
    with pytest.raises(ConfigurationError, match="no model for operation 'extra'"):
        create_app(
            Settings.from_mapping({**env, "STRICT_PLUGINS": "true"}),
            plugins=load_plugins(extra_plugins=[plugin("extra", renamed("extra"))]),
            engine=FakeEngine(),
        )


def test_operation_spec_checks_its_response_has_meta() -> None:
    class NoMeta(msgspec.Struct):
        summary: str

    with pytest.raises(ValueError, match="meta: ResponseMeta"):
        dataclasses.replace(renamed("x"), response_type=NoMeta).validate()  # type: ignore[type-var]


def test_cli_lists_plugins(env: dict[str, str], tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "ai-platform"
    result = subprocess.run(
        [str(cli), "plugins"], env={**env, "DISABLED_PLUGINS": "translate"}, cwd=tmp_path,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert lines["summarize"][1:4] == ["0.1.0", "loaded", "summarize"]
    assert lines["translate"][2] == "disabled"
