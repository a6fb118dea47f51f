"""One example through an engine, the way the server runs a request, without HTTP, auth or limits.

The steps are the orchestrator's (``services/orchestration.py``): the request schema, the
``build_model_call`` hook (the operation's prompt, as plugins wrap it), the engine's ``check``
(model loaded, prompt within the context window and ``Limits.max_input_tokens``), the model
call with the operation's output limit, the ``build_response`` hook and the response schema.
Nothing is counted in usage. Failures are recorded, never raised (cancellation still is).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from ai_platform.errors import PlatformError, RequestValidationError
from ai_platform.operations import Choice, Choose, Completion, Example, Generate, ModelCall, Operation, ResponseMeta


class Hooks(Protocol):
    """The plugins' wrappers around an operation's steps (``ai_platform.plugins.LoadedPlugins``)."""

    def build_model_call(self, operation: Operation, request: Any) -> ModelCall: ...  # type: ignore[type-arg]

    def build_response(self, operation: Operation, request: Any, result: Any, meta: ResponseMeta) -> Any: ...  # type: ignore[type-arg]


class OperationHooks:
    """No plugin wrappers: the operation's own ``prompt`` and ``respond``."""

    def build_model_call(self, operation: Operation, request: Any) -> ModelCall:  # type: ignore[type-arg]
        return operation.prompt(request)

    def build_response(self, operation: Operation, request: Any, result: Any, meta: ResponseMeta) -> Any:  # type: ignore[type-arg]
        return operation.respond(request, result, meta)


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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RequestValidationError):
        return f"422: {'; '.join(str(e.get('msg')) for e in exc.errors)}"
    if isinstance(exc, msgspec.ValidationError):
        return f"invalid: {exc}"
    if isinstance(exc, PlatformError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


async def run_example(
    operation: Operation,  # type: ignore[type-arg]
    example: Example,
    engine: Any,
    hooks: Hooks | None = None,
    *,
    example_id: str = "",
    max_output_tokens: int | None = None,
    model_name: str | None = None,
) -> ExampleRun:
    """Run ``example`` on ``engine`` (an ``InferenceEngine`` or anything with its methods).

    ``max_output_tokens`` lowers the operation's output limit (self-tests: seconds, not quality).
    """
    hooks = hooks or OperationHooks()
    run = ExampleRun(id=example_id, example=example)
    started = time.perf_counter()
    try:
        request = msgspec.convert(dict(example.request), operation.request_type)
        call = hooks.build_model_call(operation, request)
        run.call = call
        check = getattr(engine, "check", None)
        if check is not None:
            tokens = await check(operation.name, call)
            run.prompt_tokens = tokens if isinstance(tokens, int) else None
            limit = operation.limits.max_input_tokens
            if limit is not None and run.prompt_tokens is not None and run.prompt_tokens > limit:
                raise RequestValidationError(
                    [{"type": "string_too_long", "loc": ["body"], "input": None,
                      "msg": f"prompt of {run.prompt_tokens} tokens; the operation allows {limit}"}]
                )  # fmt: skip
        model_started = time.perf_counter()
        result: Completion | Choice
        if isinstance(call, Generate):
            wanted = min(
                call.max_output_tokens or operation.limits.max_output_tokens, operation.limits.max_output_tokens
            )
            if max_output_tokens is not None:
                wanted = min(wanted, max_output_tokens)
            result = await engine.generate(operation.name, call, max_output_tokens=wanted)
        elif isinstance(call, Choose):
            result = await engine.choose(operation.name, call)
        else:
            raise TypeError(f"the prompt built {type(call).__name__}, not Generate or Choose")
        run.model_s = time.perf_counter() - model_started
        run.result, run.output_tokens = result, result.output_tokens
        meta = ResponseMeta(
            operation=operation.name,
            model_used=model_name or engine.model_name(operation.name),
            input_chars=len(operation.input_text(request)),
            output_tokens=result.output_tokens,
            execution_time_ms=round((time.perf_counter() - started) * 1000, 1),
            request_id=getattr(request, "request_id", None),
            timestamp=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        )
        response = hooks.build_response(operation, request, result, meta)
        if not isinstance(response, operation.response_type):
            raise TypeError(f"respond returned {type(response).__name__}, not {operation.response_type.__name__}")
        run.response = msgspec.convert(msgspec.to_builtins(response), operation.response_type)
    except Exception as exc:
        run.error = _describe(exc)
    run.latency_s = time.perf_counter() - started
    return run
