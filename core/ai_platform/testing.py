"""Test kit for operation plugins, loaded by pytest through the ``pytest11`` entry point.

Fixtures:

- ``platform_client``: ``async with platform_client(("name", plugin_module)) as client``
  gives an ``AsyncTestClient`` for an app that serves only the given plugins,
  on a fresh SQLite database, with a :class:`FakeEngine` (or the real runtime
  on ``model_dir=...``). Send ``headers=CLIENT_HEADERS`` (or ``ADMIN_HEADERS``).
- ``tiny_model_dir``: a tiny random-weight Qwen2 ONNX model, built once with
  the export environment (``AI_PLATFORM_EXPORT_PYTHON``), for end-to-end tests.

Helpers: :func:`check_operation` runs an operation's whole pipeline on a fake
result and checks its spec and schemas; :class:`FakeEngine`.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ai_platform.engine_contract import Engine, ModelStatus, PromptTooLongError
from ai_platform.errors import ModelUnavailableError
from ai_platform.operations import Choice, Choose, Completion, Generate, ModelCall, Operation, ResponseMeta

CLIENT_KEY = "test-client-key-0123456789"
ADMIN_KEY = "test-admin-key-0123456789"
CLIENT_HEADERS = {"X-API-Key": CLIENT_KEY}
ADMIN_HEADERS = {"X-API-Key": ADMIN_KEY}

_REPO = Path(__file__).resolve().parents[2]  # the source checkout, for an editable install


@dataclass
class FakeEngine:
    """Stands in for the runtime (the whole :class:`~ai_platform.engine_contract.Engine` contract):
    answers from the prompt itself, instantly and deterministically.

    ``generate`` returns ``answer`` if set, else echoes the last message's
    words (up to ``max_output_tokens``, the final cap: the call's own
    ``max_output_tokens`` is orchestration's to apply) and adds two sentences; ``choose`` favours
    options that occur in the last message. Set ``delay``, ``fail_with`` or
    ``unavailable`` to test the platform around slow, failing or missing models.
    ``calls`` records every ``(operation, model call)``.

    ``max_prompt_chars`` stands in for the model's context window: a call whose
    prompt (the messages' characters, plus the longest option of a ``Choose``)
    is longer is refused with :class:`~ai_platform.engine_contract.PromptTooLongError`
    (in ``characters``), by ``check`` before admission and, like the runtime, by
    ``generate``/``choose`` themselves (after ``delay``: a real model tokenizes
    a queued request when its turn comes). ``checks`` records every call
    ``check`` saw.
    """

    models: dict[str, str] = field(default_factory=dict)
    answer: str | None = None
    unavailable: set[str] = field(default_factory=set)
    delay: float = 0.0
    fail_with: BaseException | None = None
    calls: list[tuple[str, object]] = field(default_factory=list)
    started: bool = False
    cancelled: int = 0
    max_prompt_chars: int | None = None
    checks: list[tuple[str, object]] = field(default_factory=list)

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    def status(self) -> list[ModelStatus]:
        return [
            ModelStatus(
                operation=op,
                model=model,
                path=f"/models/{model}",
                loaded=op not in self.unavailable,
                provider=None if op in self.unavailable else "CPUExecutionProvider",
                error="missing" if op in self.unavailable else None,
            )
            for op, model in self.models.items()
        ]

    def model_name(self, operation: str) -> str:
        return self.models.get(operation, f"fake-{operation}")

    def _unavailable(self, operation: str) -> None:
        if operation in self.unavailable:
            raise ModelUnavailableError(f"Model for operation '{operation}' is not loaded: missing")

    def _fits(self, call: ModelCall) -> None:
        if self.max_prompt_chars is None:
            return
        size = sum(len(m.content) for m in call.messages)
        if isinstance(call, Choose):
            size += max((len(option) for option in call.options), default=0)
        if size > self.max_prompt_chars:
            raise PromptTooLongError(size, self.max_prompt_chars, unit="characters")

    async def check(self, operation: str, call: ModelCall) -> int | None:
        """What the orchestrator asks before admission: a loaded model, and a prompt that fits.

        Returns the prompt's "tokens": one per character of its messages.
        """
        self.checks.append((operation, call))
        self._unavailable(operation)
        self._fits(call)
        return sum(len(message.content) for message in call.messages)

    async def _enter(self, operation: str, call: ModelCall) -> None:
        self._unavailable(operation)
        self.calls.append((operation, call))
        if self.delay:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        self._fits(call)
        if self.fail_with is not None:
            raise self.fail_with

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion:
        await self._enter(operation, call)
        if self.answer is not None:
            return Completion(text=self.answer, output_tokens=len(self.answer.split()), finish_reason="stop")
        words = call.messages[-1].content.split()
        produced = words[:max_output_tokens]
        text = " ".join(produced) + ". Second sentence. Third sentence."
        return Completion(text=text, output_tokens=len(produced), finish_reason="length")

    async def stream(
        self, operation: str, call: Generate, *, max_output_tokens: int
    ) -> AsyncGenerator[str | Completion, None]:
        """``generate``'s answer a word at a time (``delay`` before each), then the Completion."""
        completion = await self.generate(operation, call, max_output_tokens=max_output_tokens)
        for index, word in enumerate(completion.text.split(" ")):
            if index and self.delay:
                await asyncio.sleep(self.delay)
            yield word if index == 0 else " " + word
        yield completion

    async def choose(self, operation: str, call: Choose) -> Choice:
        await self._enter(operation, call)
        text = call.messages[-1].content.lower()
        logits = [float(text.count(option.lower())) for option in call.options]
        total = sum(math.exp(x) for x in logits)
        scores = {o: math.exp(x) / total for o, x in zip(call.options, logits, strict=True)}
        return Choice(scores=scores, output_tokens=2)


def check_operation(operation: Operation, example: Mapping[str, Any], *, completion: str = "A fake answer.") -> Any:
    """Validate ``operation``'s spec and run ``example`` through prompt → fake model → respond.

    Returns the response struct. Fails if the spec is invalid, the example does
    not match the request schema, a schema cannot be documented in OpenAPI, or
    ``respond`` returns something that does not match the response schema.
    """
    operation.validate()
    for kind in (operation.request_type, operation.response_type):
        msgspec.json.schema(kind)
    request = msgspec.convert(dict(example), operation.request_type)
    call = operation.prompt(request)
    result: Completion | Choice
    if isinstance(call, Generate):
        assert call.messages, "Generate needs at least one message"
        result = Completion(text=completion, output_tokens=3, finish_reason="stop")
    elif isinstance(call, Choose):
        assert len(call.options) >= 1, "Choose needs options"
        result = Choice(scores={o: 1 / len(call.options) for o in call.options}, output_tokens=1)
    else:
        raise AssertionError(f"prompt returned {type(call).__name__}, not Generate or Choose")
    meta = ResponseMeta(
        operation=operation.name, model_used="fake", input_chars=len(operation.input_text(request)),
        output_tokens=result.output_tokens, execution_time_ms=1.0, request_id=None,
        timestamp="2026-01-01T00:00:00.000Z",
    )  # fmt: skip
    response = operation.respond(request, result, meta)
    assert isinstance(response, operation.response_type), f"respond returned {type(response).__name__}"
    return msgspec.convert(msgspec.to_builtins(response), operation.response_type)


def platform_env(directory: Path, **overrides: str) -> dict[str, str]:
    """Settings variables for an isolated app with its database and logs in ``directory``."""
    return {
        "SECRET_KEY": "test-secret-key-0123456789",
        "VALID_API_KEYS": f'["{CLIENT_KEY}"]',
        "ADMIN_API_KEYS": f'["{ADMIN_KEY}"]',
        "DATABASE_URL": f"sqlite://{directory / 'usage.sqlite3'}",
        "LOG_DIR": str(directory / "logs"),
        "MODELS_DIR": str(directory / "models"),
        "DEFAULT_MODEL": "fake",
        **overrides,
    }


PlatformClientFactory = Callable[..., AbstractAsyncContextManager[Any]]


@pytest.fixture
def platform_client(tmp_path: Path) -> PlatformClientFactory:
    """Factory of test clients for an app serving only the given ``(name, plugin)`` pairs."""
    from litestar.testing import AsyncTestClient

    from ai_platform.app import create_app
    from ai_platform.plugin_config import read_plugin_config
    from ai_platform.plugins import load_plugins
    from ai_platform.settings import Settings

    @asynccontextmanager
    async def make(
        *plugins: tuple[str, object],
        engine: Engine | None = None,
        model_dir: Path | None = None,
        entry_points: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> AsyncIterator[Any]:
        overrides = dict(settings or {})
        if model_dir is not None:  # the real runtime on this model folder
            overrides.update(MODELS_DIR=str(model_dir.parent), DEFAULT_MODEL=model_dir.name)
        env = platform_env(tmp_path, **overrides)
        configured = Settings.from_mapping(env)
        loaded = load_plugins(
            enabled=configured.enabled_plugins,
            disabled=configured.disabled_plugins,
            strict=configured.strict_plugins,
            config=read_plugin_config(configured.plugins_config),
            extra_plugins=plugins,
            use_entry_points=entry_points,
        )
        if "OPERATION_MODEL_MAP" not in overrides:
            # The default map names the built-ins, which an app of only the given plugins lacks: keep the
            # entries it serves, so that its log holds no notes about the others.
            served = {k: v for k, v in configured.operation_model_map.items() if k in loaded.operations}
            configured = msgspec.structs.replace(configured, operation_model_map=served)
        if engine is None and model_dir is None:
            engine = FakeEngine()
        app = create_app(configured, plugins=loaded, engine=engine)
        async with AsyncTestClient(app) as client:
            yield client

    return make


def export_python() -> str:
    """The export environment's Python (``AI_PLATFORM_EXPORT_PYTHON``, or the checkout's ``.cache/export-venv``)."""
    return os.environ.get("AI_PLATFORM_EXPORT_PYTHON", str(_REPO / ".cache" / "export-venv" / "bin" / "python"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A random-weight Qwen2 ONNX model (real architecture, meaningless text), built once and cached."""
    out = Path(os.environ.get("AI_PLATFORM_TEST_MODELS", _REPO / ".cache" / "test-models")) / "tiny-qwen2"
    python = export_python()
    if not Path(python).exists():
        pytest.fail(f"no export environment at {python}: set AI_PLATFORM_EXPORT_PYTHON (see `make install`)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run(
        [python, "-m", "ai_platform.export", "tiny", "--out", str(out)], check=True, env=env, stdout=sys.stderr
    )
    return out
