"""Plugin discovery, admin control, validation and isolation of broken plugins."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import types
from collections.abc import Generator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from ai_platform import Limits, Message, hookimpl
from ai_platform.app import create_app
from ai_platform.errors import ConfigurationError, PluginError
from ai_platform.plugins import ENTRY_POINT_GROUP, load_plugins, new_plugin_manager
from ai_platform.settings import Settings
from ai_platform.testing import ADMIN_HEADERS, CLIENT_HEADERS, FakeEngine
from support import CLIENT_KEY

BUILT_INS = {"summarize", "translate", "classify"}
HOOKS = sorted(new_plugin_manager().hook.__dict__)  # every hookspec the core declares


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
    plugins = load_plugins(
        enabled=[*BUILT_INS, "broken"],
        disabled=settings.disabled_plugins,
        extra_plugins=[plugin("broken", ZeroDivisionError)],
    )
    app = create_app(settings, plugins=plugins, engine=FakeEngine())
    async with AsyncTestClient(app) as client:
        r = await client.post("/operations/translate", json={"text": "x"}, headers={"X-API-Key": CLIENT_KEY})
        assert r.status_code == 404
        limits = (await client.get("/limits", headers={"X-API-Key": CLIENT_KEY})).json()["limits"]
        assert "translate" not in {x["operation"] for x in limits}
        health = (await client.get("/health", headers=ADMIN_HEADERS)).json()
        assert health["status"] == "degraded"
        assert [p["name"] for p in health["failed_plugins"]] == ["broken"]


def test_operation_without_a_model_is_reported(env: dict[str, str]) -> None:
    settings = Settings.from_mapping(env)  # seed map: no entry for "extra", no DEFAULT_MODEL
    plugins = load_plugins(enabled=["summarize", "extra"], extra_plugins=[plugin("extra", renamed("extra"))])
    create_app(settings, plugins=plugins, engine=FakeEngine())
    assert "extra" not in plugins.operations
    assert "OPERATION_MODEL_MAP" in (next(p for p in plugins.plugins if p.name == "extra").error or "")
    with pytest.raises(ConfigurationError, match="no model for operation 'extra'"):
        create_app(
            Settings.from_mapping({**env, "STRICT_PLUGINS": "true"}),
            plugins=load_plugins(enabled=["summarize", "extra"], extra_plugins=[plugin("extra", renamed("extra"))]),
            engine=FakeEngine(),
        )


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"DISABLED_PLUGINS": "translate"}, "whose plugin is disabled (DISABLED_PLUGINS): not served"),
        ({"ENABLED_PLUGINS": "summarize,classify"}, "whose plugin is disabled (not in ENABLED_PLUGINS): not served"),
    ],
)
def test_a_disabled_plugin_in_the_model_map_is_named_disabled_once(
    env: dict[str, str], variables: dict[str, str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.from_mapping({**env, **variables})
    plugins = load_plugins(enabled=settings.enabled_plugins, disabled=settings.disabled_plugins)
    with caplog.at_level(logging.INFO, logger="ai_platform.plugins"):
        plugins.assign_models(settings)
    about_translate = [r for r in caplog.records if "'translate'" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in about_translate] == [
        ("INFO", f"OPERATION_MODEL_MAP names 'translate', {message}")
    ]


def test_a_model_map_entry_that_no_plugin_provides_is_a_warning(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    entries = {name: "m" for name in ("summarize", "classify", "sumarize")}  # a typo
    settings = Settings.from_mapping(
        {**env, "DISABLED_PLUGINS": "translate", "OPERATION_MODEL_MAP": json.dumps(entries)}
    )
    plugins = load_plugins(enabled=settings.enabled_plugins, disabled=settings.disabled_plugins)
    with caplog.at_level(logging.INFO, logger="ai_platform.plugins"):
        plugins.assign_models(settings)
    disabled = ", ".join(sorted(p.name for p in plugins.plugins if p.status == "disabled"))
    assert "translate" in disabled
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            f"OPERATION_MODEL_MAP names 'sumarize', which no loaded plugin provides; disabled plugins: {disabled}",
        )
    ]


@pytest.mark.anyio
async def test_the_test_kit_logs_no_warnings_about_operations_it_does_not_serve(
    platform_client: Any, tmp_path: Path
) -> None:
    """The default model map names the built-ins; a test of another plugin has nothing to hear about them."""
    import ai_platform_summarize

    async with platform_client(plugin("extra", renamed("extra"))) as client:
        assert (await client.post("/operations/extra", json={"text": "a b"}, headers=CLIENT_HEADERS)).status_code == 200
    async with platform_client(("summarize", ai_platform_summarize)) as client:
        operations = (await client.get("/operations", headers=CLIENT_HEADERS)).json()["operations"]
        assert [op["model"] for op in operations] == ["fake-summarize"]
    log = (tmp_path / "logs" / "platform.log").read_text()
    assert "serving operations: extra" in log  # the app's own log, where the notes would be
    assert [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line] == []


def test_operation_spec_checks_its_response_has_meta() -> None:
    class NoMeta(msgspec.Struct):
        summary: str

    with pytest.raises(ValueError, match="meta: ResponseMeta"):
        dataclasses.replace(renamed("x"), response_type=NoMeta).validate()  # type: ignore[type-var]


def test_only_an_operation_that_chooses_may_leave_out_max_output_tokens() -> None:
    from ai_platform_classify import OPERATION as CLASSIFY

    no_cap = Limits(max_input_chars=100)
    dataclasses.replace(CLASSIFY, limits=no_cap).validate()  # prompt -> Choose: no output to cap
    with pytest.raises(ValueError, match="limit max_output_tokens is required unless prompt is annotated"):
        dataclasses.replace(renamed("generates"), limits=no_cap).validate()  # prompt -> Generate

    def not_said(request: Any) -> Any:  # returns a Choose, but may generate for all the core knows
        return CLASSIFY.prompt(request)

    for prompt in (not_said, lambda request: CLASSIFY.prompt(request)):
        with pytest.raises(ValueError, match="max_output_tokens is required"):
            dataclasses.replace(CLASSIFY, limits=no_cap, prompt=prompt).validate()


def test_plugin_authors_find_what_they_raise_in_the_public_api() -> None:
    import ai_platform
    from ai_platform import errors

    assert ai_platform.RequestValidationError is errors.RequestValidationError
    assert "RequestValidationError" in ai_platform.__all__


def test_cli_lists_plugins(env: dict[str, str], tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "ai-platform"
    result = subprocess.run(
        [str(cli), "plugins"], env={**env, "DISABLED_PLUGINS": "translate"}, cwd=tmp_path,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}  # after the view, the header
    assert lines["summarize"][1:4] == ["0.1.0", "loaded", "summarize"]
    assert lines["translate"][2] == "disabled"


def test_hook_register_operations_receives_its_config_section() -> None:
    seen: list[object] = []
    module = types.ModuleType("configured")

    @hookimpl
    def register_operations(config: dict[str, object]) -> list[object]:
        seen.append(config)
        return [renamed("configured_op")]

    module.register_operations = register_operations  # type: ignore[attr-defined]
    loaded = load_plugins(
        extra_plugins=[("configured", module)],
        use_entry_points=False,
        config={"configured": {"labels": ["a", "b"]}, "other": {"x": 1}},
    )
    assert seen == [{"labels": ["a", "b"]}]
    assert "configured_op" in loaded.operations


def test_plugin_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    name, module = plugin("secretive", renamed("secretive"))
    monkeypatch.delenv("SECRETIVE_TOKEN", raising=False)
    config = {"secretive": {"api_token": {"env": "SECRETIVE_TOKEN"}}}
    loaded = load_plugins(extra_plugins=[(name, module)], use_entry_points=False, config=config)
    assert "needs the environment variable SECRETIVE_TOKEN" in (loaded.plugins[0].error or "")
    monkeypatch.setenv("SECRETIVE_TOKEN", "t0ken")
    assert (
        load_plugins(extra_plugins=[(name, module)], use_entry_points=False, config=config).plugins[0].status
        == "loaded"
    )
    literal = {"secretive": {"api_token": "written-in-the-file"}}
    loaded = load_plugins(extra_plugins=[(name, module)], use_entry_points=False, config=literal)
    assert "looks secret" in (loaded.plugins[0].error or "")


def test_plugins_config_file_is_read(env: dict[str, str], tmp_path: Path) -> None:
    from ai_platform.plugins import load_configured_plugins

    config = tmp_path / "plugins.toml"
    config.write_text('[summarize]\nanything = "goes"\n')
    settings = Settings.from_mapping({**env, "PLUGINS_CONFIG": str(config)})
    assert set(load_configured_plugins(settings).operations) == BUILT_INS
    config.write_text("not = [valid")
    with pytest.raises(ConfigurationError, match="PLUGINS_CONFIG"):
        load_configured_plugins(settings)


def test_incompatible_plugin_api_version_is_refused() -> None:
    name, module = plugin("future", renamed("future"))
    module.PLUGIN_API_VERSION = 2  # type: ignore[attr-defined]
    loaded = load_plugins(extra_plugins=[(name, module)], use_entry_points=False)
    assert loaded.plugins[0].status == "failed"
    assert loaded.plugins[0].error == ("built for plugin API version 2; this AI Platform supports plugin API version 1")


@pytest.mark.anyio
async def test_hook_build_model_call_wrappers_see_and_replace_the_call(platform_client: Any) -> None:
    import ai_platform_summarize

    module = types.ModuleType("shouting")

    @hookimpl(wrapper=True)
    def build_model_call(operation: object, request: object) -> Generator[None, Any, Any]:
        call = yield
        return dataclasses.replace(call, messages=[Message(m.role, m.content.upper()) for m in call.messages])

    module.build_model_call = build_model_call  # type: ignore[attr-defined]
    engine = FakeEngine()
    async with platform_client(("summarize", ai_platform_summarize), ("shouting", module), engine=engine) as client:
        r = await client.post("/operations/summarize", json={"text": "quiet words"}, headers=CLIENT_HEADERS)
        assert r.status_code == 200
    [(_, call)] = engine.calls
    assert "QUIET WORDS" in call.messages[-1].content


@pytest.mark.anyio
async def test_hook_build_response_wrappers_post_process_and_are_validated(platform_client: Any) -> None:
    import ai_platform_summarize

    module = types.ModuleType("stamp")

    @hookimpl(wrapper=True)
    def build_response(operation: object, request: object, result: object, meta: object) -> Generator[None, Any, Any]:
        response = yield
        return msgspec.structs.replace(response, summary="stamped")

    module.build_response = build_response  # type: ignore[attr-defined]
    async with platform_client(("summarize", ai_platform_summarize), ("stamp", module)) as client:
        r = await client.post("/operations/summarize", json={"text": "a b c"}, headers=CLIENT_HEADERS)
        assert r.json()["summary"] == "stamped"


@pytest.mark.anyio
async def test_get_operations_and_admin_only_get_plugins(platform_client: Any) -> None:
    import ai_platform_classify

    async with platform_client(("classify", ai_platform_classify), plugin("broken", ZeroDivisionError)) as client:
        ops = (await client.get("/operations", headers=CLIENT_HEADERS)).json()["operations"]
        assert ops == [
            {
                "name": "classify",
                "summary": ai_platform_classify.OPERATION.summary,
                "path": "/operations/classify",
                "plugin": "classify",
                "model": "fake-classify",
                "max_input_chars": 2000,
                "max_output_tokens": 64,
                "max_input_tokens": 3072,
                "daily_limit": 1000,
                "schema": "/schema/openapi.json#/paths/~1operations~1classify/post",
            }
        ]
        schema = (await client.get("/schema/openapi.json", headers=CLIENT_HEADERS)).json()
        assert "requestBody" in schema["paths"]["/operations/classify"]["post"]
        assert (await client.get("/plugins", headers=CLIENT_HEADERS)).status_code == 403
        plugins = (await client.get("/plugins", headers=ADMIN_HEADERS)).json()["plugins"]
        assert [(p["name"], p["status"]) for p in plugins] == [("classify", "loaded"), ("broken", "failed")]
        assert plugins[0]["hooks"] == ["register_operations"]


def test_broken_installed_package_is_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real distribution on sys.path whose plugin module fails to import."""
    dist = tmp_path / "ai_platform_broken-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ai-platform-broken\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = ai_platform_broken\n")
    (tmp_path / "ai_platform_broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_plugins()
    broken = next(p for p in loaded.plugins if p.name == "broken")
    assert (broken.distribution, broken.version, broken.status) == ("ai-platform-broken", "0.1.0", "failed")
    assert "No module named 'no_such_dependency_xyz'" in (broken.error or "")
    assert set(loaded.operations) >= BUILT_INS
    with pytest.raises(PluginError, match="plugin 'broken' failed"):
        load_plugins(strict=True)


def test_duplicate_plugin_name_leaves_the_first_one_working() -> None:
    loaded = load_plugins(extra_plugins=[plugin("summarize", renamed("impostor"))])
    reports = [p for p in loaded.plugins if p.name == "summarize"]
    assert [(p.status, p.operations) for p in reports] == [("loaded", ["summarize"]), ("failed", [])]
    assert reports[1].error == "another plugin is already registered under this name"
    assert "summarize" in loaded.operations and "impostor" not in loaded.operations


def spy_plugin(calls: list[tuple[str, dict[str, object]]]) -> types.ModuleType:
    """A plugin implementing every hookspec with a spy that takes all of the hook's arguments and changes nothing."""
    module = types.ModuleType("spy")
    manager = new_plugin_manager()
    for name in HOOKS:
        spec = getattr(manager.hook, name).spec
        # Nothing to add: None lets a firstresult hook fall through to the core's own implementation.
        result = "None" if spec.opts["firstresult"] else "[]"
        namespace: dict[str, object] = {"calls": calls}
        exec(  # a function with exactly the spec's argument names (pluggy passes arguments by name)
            f"def {name}({', '.join(spec.argnames)}):\n    calls.append(({name!r}, dict(locals())))\n    return {result}\n",
            namespace,
        )
        setattr(module, name, hookimpl(namespace[name]))
    return module


def test_the_hook_list_is_every_hookspec_the_core_declares() -> None:
    """The meta-test below runs once per name in ``HOOKS``: an empty or partial list would pass it vacuously."""
    from ai_platform import hookspecs

    marker = f"{hookspecs.PROJECT_NAME}_spec"  # the attribute pluggy's HookspecMarker sets on each spec
    declared = sorted(name for name, value in vars(hookspecs).items() if callable(value) and hasattr(value, marker))
    assert HOOKS == declared == ["build_model_call", "build_response", "register_operations"]


@pytest.mark.anyio
@pytest.mark.parametrize("hook", HOOKS)
async def test_every_hookspec_is_called_by_the_core_with_all_its_arguments(platform_client: Any, hook: str) -> None:
    """A hookspec that the core never calls (or calls without an argument it declares) fails here."""
    import ai_platform_classify
    import ai_platform_summarize

    calls: list[tuple[str, dict[str, object]]] = []
    plugins = (("summarize", ai_platform_summarize), ("classify", ai_platform_classify), ("spy", spy_plugin(calls)))
    async with platform_client(*plugins) as client:
        r = await client.post("/operations/summarize", json={"text": "One. Two."}, headers=CLIENT_HEADERS)
        assert r.status_code == 200, r.text
        body = {"text": "the router is down", "categories": ["billing", "router"]}
        r = await client.post("/operations/classify", json=body, headers=CLIENT_HEADERS)
        assert r.status_code == 200, r.text
        plugins_report = {p["name"]: p for p in (await client.get("/plugins", headers=ADMIN_HEADERS)).json()["plugins"]}
    assert plugins_report["spy"]["status"] == "loaded" and plugins_report["spy"]["hooks"] == HOOKS
    seen = [arguments for name, arguments in calls if name == hook]
    assert seen, f"the core never called the hook {hook!r}"
    argnames = getattr(new_plugin_manager().hook, hook).spec.argnames
    for arguments in seen:
        assert list(arguments) == list(argnames)
        assert all(value is not None for value in arguments.values()), arguments
