"""Plugin loading: the only module that talks to pluggy's plugin manager.

Plugins are found through the ``ai_platform.operations`` entry-point group
(built-ins use the same door as third-party packages). A plugin that fails to
import, register or validate is logged, skipped and reported in ``/health``,
``GET /plugins`` and ``ai-platform plugins``; with ``STRICT_PLUGINS`` it stops
startup instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal, cast

import msgspec
import pluggy

from ai_platform import chat, hookspecs
from ai_platform.errors import ConfigurationError, PluginError
from ai_platform.operations import ModelCall, ModelResult, Operation, ResponseMeta
from ai_platform.plugin_config import read_plugin_config, resolve_section
from ai_platform.settings import PluginSettings

ENTRY_POINT_GROUP = "ai_platform.operations"

log = logging.getLogger(__name__)

PluginStatus = Literal["loaded", "disabled", "failed"]


@dataclass
class PluginInfo:
    """What ``ai-platform plugins`` and ``/health`` report about one plugin."""

    name: str
    distribution: str | None
    version: str | None
    status: PluginStatus
    operations: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class LoadedPlugins:
    """The result of loading: the manager, per-plugin reports and the valid operations by name."""

    manager: pluggy.PluginManager
    plugins: list[PluginInfo]
    operations: dict[str, Operation]

    @property
    def problems(self) -> list[PluginInfo]:
        """Plugins that failed, or lost an operation to configuration (shown in ``/health``)."""
        return [p for p in self.plugins if p.error is not None]

    def owner_of(self, operation: str) -> PluginInfo:
        return next(p for p in self.plugins if operation in p.operations)

    def assign_models(self, settings: PluginSettings) -> dict[str, str]:
        """Map each operation to its model folder; an operation with none is reported and dropped."""
        models: dict[str, str] = {}
        for name in list(self.operations):
            model = settings.operation_model_map.get(name, settings.default_model)
            if model is None:
                message = f"no model for operation '{name}': add it to OPERATION_MODEL_MAP or set DEFAULT_MODEL"
                if settings.strict_plugins:
                    raise ConfigurationError(message)
                log.error("%s (operation not served)", message)
                owner = self.owner_of(name)
                del self.operations[name]
                owner.operations.remove(name)
                owner.error = message
                if not owner.operations:
                    owner.status = "failed"
                continue
            models[name] = model
        self._report_unused_map_entries(settings)
        return models

    def _report_unused_map_entries(self, settings: PluginSettings) -> None:
        """One line per OPERATION_MODEL_MAP entry that serves nothing, saying why when it is known.

        A disabled plugin is never loaded, so its operations are unknown: an entry is taken to be
        that plugin's when it has the plugin's name, as the built-ins' and most plugins' operations do.
        """
        status: dict[str, PluginStatus] = {}
        for plugin in self.plugins:  # under a name taken twice, the first plugin is the one that counts
            status.setdefault(plugin.name, plugin.status)
        disabled = sorted(name for name, state in status.items() if state == "disabled")
        for name in sorted(settings.operation_model_map.keys() - self.operations.keys()):
            if status.get(name) == "disabled":
                why = "DISABLED_PLUGINS" if name in settings.disabled_plugins else "not in ENABLED_PLUGINS"
                log.info("OPERATION_MODEL_MAP names '%s', whose plugin is disabled (%s): not served", name, why)
            elif status.get(name) != "failed":  # a failed plugin has logged its error already
                hint = f"; disabled plugins: {', '.join(disabled)}" if disabled else ""
                log.warning("OPERATION_MODEL_MAP names '%s', which no loaded plugin provides%s", name, hint)

    def build_model_call(self, operation: Operation, request: Any) -> ModelCall:
        """The ``build_model_call`` hook: the operation's prompt, as wrapped by plugins."""
        return cast(ModelCall, self.manager.hook.build_model_call(operation=operation, request=request))

    def build_response(
        self, operation: Operation, request: Any, result: ModelResult, meta: ResponseMeta
    ) -> msgspec.Struct:
        """The ``build_response`` hook: the operation's response, as wrapped by plugins (checked by the caller)."""
        return cast(
            msgspec.Struct,
            self.manager.hook.build_response(operation=operation, request=request, result=result, meta=meta),
        )

    def wraps_responses(self) -> bool:
        """Whether a plugin implements ``build_response`` (and may change the text, as ``redact`` does)."""
        return any(impl.plugin_name != CORE_PLUGIN_NAME for impl in self.manager.hook.build_response.get_hookimpls())


class _CoreHooks:
    """The core's own implementations, which plugins' wrappers wrap."""

    @hookspecs.hookimpl(trylast=True)
    def build_model_call(self, operation: Operation, request: Any) -> ModelCall:
        return operation.prompt(request)

    @hookspecs.hookimpl(trylast=True)
    def build_response(
        self, operation: Operation, request: Any, result: ModelResult, meta: ResponseMeta
    ) -> msgspec.Struct:
        response: msgspec.Struct = operation.respond(request, result, meta)
        return response


CORE_PLUGIN_NAME = "ai_platform.core"


def new_plugin_manager() -> pluggy.PluginManager:
    """A fresh manager with the platform's hookspecs (one per app, never module-global)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(_CoreHooks(), name=CORE_PLUGIN_NAME)
    return pm


def load_plugins(
    *,
    enabled: Sequence[str] | None = None,
    disabled: Sequence[str] = (),
    strict: bool = False,
    extra_plugins: Iterable[tuple[str, object]] = (),
    use_entry_points: bool = True,
    config: Mapping[str, Mapping[str, Any]] | None = None,
) -> LoadedPlugins:
    """Load, register and validate operation plugins.

    ``enabled`` (``None`` = all) and ``disabled`` filter by plugin name, which is
    the entry-point name. ``extra_plugins`` are ``(name, module_or_object)``
    pairs registered in-process, as tests do. ``config`` maps plugin names to
    their configuration sections (see :mod:`ai_platform.plugin_config`).
    """
    pm = new_plugin_manager()
    loader = _Loader(pm, strict=strict, config=config or {})
    candidates: list[tuple[str, EntryPoint | object]] = []
    if use_entry_points:
        candidates.extend((ep.name, ep) for ep in entry_points(group=ENTRY_POINT_GROUP))
    candidates.extend(extra_plugins)

    for name, source in candidates:
        if (enabled is not None and name not in enabled) or name in disabled:
            pm.set_blocked(name)
            loader.report(name, source, "disabled")
            continue
        loader.register(name, source)
    loader.check_pending()
    loader.collect_operations()
    return LoadedPlugins(manager=pm, plugins=loader.infos, operations=loader.operations)


class _Loader:
    def __init__(self, pm: pluggy.PluginManager, *, strict: bool, config: Mapping[str, Mapping[str, Any]]) -> None:
        self.pm = pm
        self.strict = strict
        self.config = config
        self.infos: list[PluginInfo] = []
        self.operations: dict[str, Operation] = {}
        self._by_name: dict[str, PluginInfo] = {}

    def report(self, name: str, source: object, status: PluginStatus) -> PluginInfo:
        dist = source.dist if isinstance(source, EntryPoint) else None
        info = PluginInfo(
            name=name,
            distribution=dist.name if dist else None,
            version=dist.version if dist else None,
            status=status,
        )
        self.infos.append(info)
        # A second plugin under a taken name is reported, but never replaces the first.
        self._by_name.setdefault(name, info)
        return info

    def fail(self, info: PluginInfo, error: str) -> None:
        message = f"plugin {info.name!r} failed: {error}"
        if self.strict:
            raise PluginError(message)
        log.error("%s (skipped; set STRICT_PLUGINS=true to make this fatal)", message)
        info.status, info.error, info.operations = "failed", error, []
        if self._by_name[info.name] is info and self.pm.get_plugin(info.name) is not None:
            self.pm.unregister(name=info.name)

    def register(self, name: str, source: EntryPoint | object) -> None:
        taken = name in self._by_name
        info = self.report(name, source, "loaded")
        if taken:
            self.fail(info, "another plugin is already registered under this name")
            return
        try:
            plugin = source.load() if isinstance(source, EntryPoint) else source
            _check_api_version(plugin)
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self.fail(info, _describe_error(exc))
            return
        info.hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])

    def check_pending(self) -> None:
        """Hooks a plugin implements that no spec declares (typos) make that plugin fail."""
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin)
                if name is None:  # not one of ours: nothing to isolate
                    raise
                self.fail(self._by_name[name], str(exc))

    def collect_operations(self) -> None:
        # Each implementation is called on its own so that one failing plugin
        # is attributed and isolated instead of breaking the whole hook call.
        for impl in self.pm.hook.register_operations.get_hookimpls():
            info = self._by_name[impl.plugin_name]
            try:
                arguments = {"config": resolve_section(self.config.get(impl.plugin_name, {}))}
                # Each implementation receives the subset of arguments it asks for (pluggy's rule).
                kwargs = {name: arguments[name] for name in impl.argnames}
                operations: list[Any] = list(cast(Iterable[Any], impl.function(**kwargs)))
                names: list[str] = []
                for op in operations:
                    if not isinstance(op, Operation):
                        raise ValueError(f"register_operations returned {type(op).__name__}, not Operation")
                    op.validate()
                    if op.name in self.operations or op.name in names:
                        owner = next((p.name for p in self.infos if op.name in p.operations), impl.plugin_name)
                        raise ValueError(f"operation {op.name!r} is already provided by plugin {owner!r}")
                    names.append(op.name)
            except Exception as exc:
                self.fail(info, _describe_error(exc))
                continue
            info.operations = [op.name for op in operations]
            self.operations.update((op.name, op) for op in operations)


def _describe_error(exc: Exception) -> str:
    # Our own messages are complete sentences; anything else is named by its type.
    return str(exc) if isinstance(exc, PluginError | ValueError) else f"{type(exc).__name__}: {exc}"


def _check_api_version(plugin: object) -> None:
    version = getattr(plugin, "PLUGIN_API_VERSION", hookspecs.PLUGIN_API_VERSION)
    if version not in hookspecs.SUPPORTED_PLUGIN_API_VERSIONS:
        supported = ", ".join(map(str, hookspecs.SUPPORTED_PLUGIN_API_VERSIONS))
        raise PluginError(
            f"built for plugin API version {version!r}; this AI Platform supports plugin API version {supported}"
        )


def load_configured_plugins(settings: PluginSettings) -> LoadedPlugins:
    """Load plugins as the settings say (allow/deny lists, strictness, per-plugin configuration).

    ``OPENAI_API=true`` adds the core's ``chat`` plugin (the operation behind ``/v1``), subject to
    the same lists.
    """
    return load_plugins(
        enabled=settings.enabled_plugins,
        disabled=settings.disabled_plugins,
        strict=settings.strict_plugins,
        config=read_plugin_config(settings.plugins_config),
        extra_plugins=[(chat.PLUGIN_NAME, chat)] if settings.openai_api else [],
    )


def describe(plugins: Sequence[PluginInfo]) -> list[dict[str, Any]]:
    """Plugin reports as plain data (for JSON and the CLI)."""
    return [dataclasses.asdict(p) for p in plugins]
