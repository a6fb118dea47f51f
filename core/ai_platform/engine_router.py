"""Which engine serves each operation: the local runtime or a remote OpenAI-compatible engine.

:func:`build_engine` is the one place that turns the settings and the operation → model map into the engine
that ``serve``, ``selftest`` and ``eval`` run: a map value ``openai+http(s)://…#MODEL`` is a remote engine
(``ai_platform.remote``), anything else a local model folder (``ai_platform.runtime``, imported only when
some operation is local, so that a server of remote engines only never loads onnxruntime).
:class:`EngineRouter` serves a map holding both kinds.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

from ai_platform.engine_contract import Engine, ModelStatus
from ai_platform.errors import ConfigurationError, ModelUnavailableError
from ai_platform.operations import Choice, Choose, Completion, Generate, ModelCall
from ai_platform.remote.target import RemoteTarget, is_remote, parse_target
from ai_platform.settings import PluginSettings, Settings


class EngineRouter:
    """The engine contract over several engines, each serving some operations (``routes``: operation → engine)."""

    def __init__(self, routes: Mapping[str, Engine]) -> None:
        self._routes = dict(routes)
        self._engines = list({id(engine): engine for engine in self._routes.values()}.values())

    async def start(self) -> None:
        for engine in self._engines:
            await engine.start()

    async def close(self) -> None:
        errors: list[BaseException] = []
        for engine in self._engines:
            try:
                await engine.close()
            except Exception as exc:  # close the others all the same
                errors.append(exc)
        if errors:
            raise errors[0]

    def status(self) -> list[ModelStatus]:
        statuses = {s.operation: s for engine in self._engines for s in engine.status()}
        return [statuses[operation] for operation in self._routes if operation in statuses]

    def _engine(self, operation: str) -> Engine:
        engine = self._routes.get(operation)
        if engine is None:
            raise ModelUnavailableError(f"No model is configured for operation '{operation}'.")
        return engine

    def model_name(self, operation: str) -> str:
        return self._routes[operation].model_name(operation)

    async def check(self, operation: str, call: ModelCall) -> int | None:
        return await self._engine(operation).check(operation, call)

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion:
        return await self._engine(operation).generate(operation, call, max_output_tokens=max_output_tokens)

    def stream(
        self, operation: str, call: Generate, *, max_output_tokens: int
    ) -> AsyncGenerator[str | Completion, None]:
        return self._engine(operation).stream(operation, call, max_output_tokens=max_output_tokens)

    async def choose(self, operation: str, call: Choose) -> Choice:
        return await self._engine(operation).choose(operation, call)


def setting_of(settings: PluginSettings, operation: str) -> str:
    """The setting an operation's model came from, for error messages."""
    if operation in settings.operation_model_map:
        return f"OPERATION_MODEL_MAP['{operation}']"
    return "DEFAULT_MODEL"


def remote_targets(
    settings: Settings, operation_models: Mapping[str, str], *, environ: Mapping[str, str] | None = None
) -> tuple[dict[str, RemoteTarget], dict[str, str]]:
    """The operations served remotely, their targets (timeouts resolved) and the API keys they name.

    A ``key_env`` naming a variable that is not set (or is blank) is a :class:`ConfigurationError`.
    """
    environ = os.environ if environ is None else environ
    targets: dict[str, RemoteTarget] = {}
    keys: dict[str, str] = {}
    for operation, value in operation_models.items():
        if not is_remote(value):
            continue
        setting = setting_of(settings, operation)
        target = parse_target(value, setting=setting).with_default_timeout(settings.request_timeout_seconds)
        if target.key_env is not None:
            key = environ.get(target.key_env, "")
            if not key.strip():
                raise ConfigurationError(
                    f"{setting}: key_env names the environment variable {target.key_env}, which is not set "
                    "(the engine's API key is read from the environment)"
                )
            keys[target.key_env] = key.strip()
        targets[operation] = target
    return targets, keys


def build_engine(
    settings: Settings,
    operation_models: Mapping[str, str],
    *,
    models_dir: Path | None = None,
    isolation: str | None = None,
    environ: Mapping[str, str] | None = None,
    **remote_options: Any,
) -> Engine:
    """The engine for ``operation_models`` (operation → local folder or remote engine URL).

    ``models_dir`` and ``isolation`` go to the local runtime (``InferenceEngine.from_settings``),
    ``remote_options`` to :class:`~ai_platform.remote.engine.RemoteEngine` (tests: a small circuit breaker).
    """
    targets, keys = remote_targets(settings, operation_models, environ=environ)
    local = {operation: model for operation, model in operation_models.items() if operation not in targets}
    remote: Engine | None = None
    runtime: Engine | None = None
    if targets:
        from ai_platform.remote.engine import RemoteEngine  # httpx: only when some operation is remote

        remote = RemoteEngine(targets, api_keys=keys, **remote_options)
    if local or not targets:
        from ai_platform.runtime.engine import InferenceEngine  # onnxruntime: only when some operation is local

        runtime = InferenceEngine.from_settings(settings, local, models_dir=models_dir, isolation=isolation)
    if remote is None or runtime is None:
        only = remote or runtime
        assert only is not None
        return only
    return EngineRouter({op: remote if op in targets else runtime for op in operation_models})
