"""One example through an engine, the way the server runs a request, without HTTP, auth or limits.

The example runs through the orchestrator itself (``services/orchestration.py``), so it meets
every step a request meets: the request schema (here, as the route checks it), the input's own
limits, the ``build_model_call`` hook (the operation's prompt, as plugins wrap it), the engine's
``check`` (model loaded, prompt within the context window and ``Limits.max_input_tokens``), the
model call with the operation's output limit, the ``build_response`` hook and the response
schema. Its limits count nothing (:class:`Unlimited`) and it has no timeout of its own (callers
set theirs). Failures are recorded, never raised (cancellation still is).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Protocol

import msgspec

from ai_platform.engine_contract import Engine, ModelStatus
from ai_platform.errors import OperationError, RequestValidationError
from ai_platform.limits.service import RateLimit, Reservation
from ai_platform.operations import Choice, Choose, Completion, Example, Generate, ModelCall, Operation, ResponseMeta
from ai_platform.services.orchestration import OrchestrationService

EVALUATION_KEY = "evaluation"  # the key id an example runs as (nothing is counted for it)


class Hooks(Protocol):
    """The plugins' wrappers around an operation's steps (``ai_platform.plugins.LoadedPlugins``)."""

    def build_model_call(self, operation: Operation, request: Any) -> ModelCall: ...

    def build_response(self, operation: Operation, request: Any, result: Any, meta: ResponseMeta) -> Any: ...


class OperationHooks:
    """No plugin wrappers: the operation's own ``prompt`` and ``respond``."""

    def build_model_call(self, operation: Operation, request: Any) -> ModelCall:
        return operation.prompt(request)

    def build_response(self, operation: Operation, request: Any, result: Any, meta: ResponseMeta) -> Any:
        return operation.respond(request, result, meta)


@dataclass(frozen=True)
class _Unstreamed:
    """``hooks`` as orchestration runs them; an example is never streamed, so no response is said to be wrapped."""

    hooks: Hooks

    def build_model_call(self, operation: Operation, request: Any) -> ModelCall:
        return self.hooks.build_model_call(operation, request)

    def build_response(self, operation: Operation, request: Any, result: Any, meta: ResponseMeta) -> Any:
        return self.hooks.build_response(operation, request, result, meta)

    def wraps_responses(self) -> bool:
        return False


class Unlimited:
    """Limits that admit every request and count nothing: an example is not a client's request."""

    async def admit(self, operation: str, key_id: str) -> Reservation:
        no_limit = RateLimit(limit=0, remaining=0, reset_seconds=0)  # never shown: no response carries headers here
        return Reservation(id=0, operation=operation, key_id=key_id, day=date.today(), rate_limit=no_limit)

    async def commit(self, reservation: Reservation, *, tokens: int) -> None:
        return None

    async def release(self, reservation: Reservation) -> None:
        return None


@dataclass
class ExampleRun:
    """What happened to one example."""

    id: str
    example: Example
    call: ModelCall | None = None
    result: Completion | Choice | None = None
    response: Any = None  # the response struct, validated against the operation's schema
    error: str | None = None  # why there is no response
    latency_s: float = 0.0  # request schema to validated response, as the server times a request
    model_s: float = 0.0  # the model call alone
    prompt_tokens: int | None = None
    output_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    def field(self, name: str) -> Any:
        """A response field (``None`` without a response)."""
        return getattr(self.response, name, None) if self.response is not None else None


class _Observed:
    """``engine`` as one example's run sees it: it records the model call, its result and its time,
    names the model as asked, and lowers the output limit as asked (self-tests: seconds, not quality)."""

    def __init__(
        self, engine: Engine, run: ExampleRun, *, max_output_tokens: int | None, model_name: str | None
    ) -> None:
        self._engine = engine
        self._run = run
        self._max_output_tokens = max_output_tokens
        self._model_name = model_name

    async def start(self) -> None:
        await self._engine.start()

    async def close(self) -> None:
        await self._engine.close()

    def status(self) -> Sequence[ModelStatus]:
        return self._engine.status()

    def model_name(self, operation: str) -> str:
        return self._model_name or self._engine.model_name(operation)

    async def check(self, operation: str, call: ModelCall) -> int | None:
        self._run.call = call
        self._run.prompt_tokens = await self._engine.check(operation, call)
        return self._run.prompt_tokens

    def _cap(self, max_output_tokens: int) -> int:
        return max_output_tokens if self._max_output_tokens is None else min(max_output_tokens, self._max_output_tokens)

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion:
        started = time.perf_counter()
        result = await self._engine.generate(operation, call, max_output_tokens=self._cap(max_output_tokens))
        self._run.model_s = time.perf_counter() - started
        self._run.result = result
        return result

    async def stream(
        self, operation: str, call: Generate, *, max_output_tokens: int
    ) -> AsyncGenerator[str | Completion, None]:
        yield await self.generate(operation, call, max_output_tokens=max_output_tokens)  # examples are not streamed

    async def choose(self, operation: str, call: Choose) -> Choice:
        started = time.perf_counter()
        result = await self._engine.choose(operation, call)
        self._run.model_s = time.perf_counter() - started
        self._run.result = result
        return result


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RequestValidationError):
        return f"422: {'; '.join(str(e.get('msg')) for e in exc.errors)}"
    if isinstance(exc, msgspec.ValidationError):
        return f"invalid: {exc}"
    if isinstance(exc, OperationError) and exc.__cause__ is not None:
        # The server's 500 says only which operation failed (its log has the rest); a report names the cause.
        return f"{type(exc).__name__}: {exc} ({type(exc.__cause__).__name__}: {exc.__cause__})"
    return f"{type(exc).__name__}: {exc}"


async def run_example(
    operation: Operation,
    example: Example,
    engine: Engine,
    hooks: Hooks | None = None,
    *,
    example_id: str = "",
    max_output_tokens: int | None = None,
    model_name: str | None = None,
) -> ExampleRun:
    """Run ``example`` on ``engine``.

    ``max_output_tokens`` lowers the operation's output limit (self-tests: seconds, not quality);
    ``model_name`` is the response's ``meta.model_used`` (default: the engine's name for it).
    """
    run = ExampleRun(id=example_id, example=example)
    observed = _Observed(engine, run, max_output_tokens=max_output_tokens, model_name=model_name)
    orchestration = OrchestrationService(
        {operation.name: operation},
        observed,
        Unlimited(),
        timeout_seconds=None,
        hooks=_Unstreamed(hooks or OperationHooks()),
    )
    started = time.perf_counter()
    try:
        request = msgspec.convert(dict(example.request), operation.request_type)
        outcome = await orchestration.run(operation, request, key_id=EVALUATION_KEY)
        run.output_tokens = outcome.output_tokens
        # Orchestration checked the response against its schema; this is that validated copy.
        run.response = msgspec.convert(msgspec.to_builtins(outcome.response), operation.response_type)
    except Exception as exc:
        run.error = _describe(exc)
    run.latency_s = time.perf_counter() - started
    return run
