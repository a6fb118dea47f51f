"""Orchestration layer: model selection, limit enforcement, centralized error handling.

One request flows: input limits (before any model work) → atomic admission
against the daily limit → the plugin's prompt → the runtime → the plugin's
response. A request is counted once if and only if it returns a response: its
reservation is committed last, and given back if anything before fails.

"Returns a response" means its commit ran, which is the last thing before its 200
is sent. A client that disconnects after that (while the 200 is on its way, or
during the commit itself, then audited as 499) is counted without receiving the
answer. That window is left open on purpose: HTTP has no receipt, so no server
can close it (behind nginx the app never sees the client at all), and committing
after sending would instead allow the opposite, a 200 delivered but never
counted (the database failing or the process dying after the send), which breaks
the exact limits. See README.md, "API".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from ai_platform.errors import OperationError, PlatformError, RequestTimeoutError, RequestValidationError
from ai_platform.operations import Choice, Choose, Completion, Generate, Operation, ResponseMeta
from ai_platform.usage.limit_service import LimitService, RateLimit

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the platform needs from the runtime (``ai_platform.runtime.engine.InferenceEngine``)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def status(self) -> Sequence[Any]: ...

    def model_name(self, operation: str) -> str: ...

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion: ...

    async def choose(self, operation: str, call: Choose) -> Choice: ...


class ExecutionHooks(Protocol):
    """Where plugins may wrap an operation's own steps (``ai_platform.plugins.LoadedPlugins``)."""

    def build_model_call(self, operation: Operation, request: Any) -> Generate | Choose: ...  # type: ignore[type-arg]

    def build_response(self, operation: Operation, request: Any, result: Any, meta: ResponseMeta) -> Any: ...  # type: ignore[type-arg]


@dataclass(frozen=True)
class Outcome:
    """A served request: its response, its cost, and the caller's limit after it."""

    response: Any
    output_tokens: int
    rate_limit: RateLimit


def iso_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``, as in the seed (``2025-01-15T10:30:00.000Z``)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class OrchestrationService:
    def __init__(
        self,
        operations: Mapping[str, Operation],  # type: ignore[type-arg]
        engine: Engine,
        limits: LimitService,
        *,
        timeout_seconds: float = 300.0,
        hooks: ExecutionHooks,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.operations = operations
        self.engine = engine
        self.limits = limits
        self.timeout_seconds = timeout_seconds
        self.hooks = hooks
        self._clock = clock

    async def run(self, operation: Operation, request: Any, *, key_id: str) -> Outcome:  # type: ignore[type-arg]
        """Execute one validated request for the caller with key id ``key_id``."""
        started = time.perf_counter()
        input_text = self._plugin_step(operation, "input_text", operation.input_text, request)
        self._check_input(operation, input_text)
        call = self._plugin_step(operation, "prompt", self.hooks.build_model_call, operation, request)
        reservation = await self.limits.admit(operation.name, key_id)
        try:
            try:
                async with asyncio.timeout(self.timeout_seconds):
                    result = await self._call_model(operation, call)
            except TimeoutError:
                raise RequestTimeoutError(f"Request timed out after {self.timeout_seconds:g} seconds.") from None
            meta = ResponseMeta(
                operation=operation.name,
                model_used=self.engine.model_name(operation.name),
                input_chars=len(input_text),
                output_tokens=result.output_tokens,
                execution_time_ms=round((time.perf_counter() - started) * 1000, 1),
                request_id=getattr(request, "request_id", None),
                timestamp=iso_timestamp(self._clock()),
            )
            response = self._plugin_step(operation, "respond", self._respond, operation, request, result, meta)
            await self.limits.commit(reservation, tokens=result.output_tokens)
        except BaseException:
            # Failed, cancelled (client gone), timed out or not recorded: not a served request.
            await self.limits.release(reservation)
            raise
        return Outcome(response, result.output_tokens, reservation.rate_limit)

    @staticmethod
    def _check_input(operation: Operation, text: str) -> None:  # type: ignore[type-arg]
        # The request schema normally enforces this already; this is the guarantee
        # for plugins whose schema does not.
        limit = operation.limits.max_input_chars
        if len(text) > limit:
            raise RequestValidationError(
                [
                    {
                        "type": "string_too_long",
                        "loc": ["body", "text"],
                        "msg": f"String should have at most {limit} characters",
                        "input": text[:100] + "…",
                    }
                ]
            )

    async def _call_model(self, operation: Operation, call: Generate | Choose) -> Completion | Choice:  # type: ignore[type-arg]
        if isinstance(call, Generate):
            limit = operation.limits.max_output_tokens
            wanted = min(call.max_output_tokens or limit, limit)
            return await self.engine.generate(operation.name, call, max_output_tokens=wanted)
        if isinstance(call, Choose):
            return await self.engine.choose(operation.name, call)
        raise OperationError(f"Operation '{operation.name}' built an unsupported model call.")

    def _respond(self, operation: Operation, request: Any, result: Completion | Choice, meta: ResponseMeta) -> Any:  # type: ignore[type-arg]
        response = self.hooks.build_response(operation, request, result, meta)
        if not isinstance(response, operation.response_type):
            raise TypeError(f"respond returned {type(response).__name__}")
        # Re-validate so a plugin bug surfaces here, named, instead of as a broken body.
        msgspec.convert(msgspec.to_builtins(response), operation.response_type)
        return response

    @staticmethod
    def _plugin_step(operation: Operation, step: str, function: Callable[..., Any], *args: Any) -> Any:  # type: ignore[type-arg]
        """Run plugin code; its failures are logged with the operation's name and answered with a bare 500."""
        try:
            return function(*args)
        except PlatformError:
            raise
        except Exception as exc:
            log.exception("operation %r failed in %s", operation.name, step)
            raise OperationError(f"Operation '{operation.name}' failed.") from exc
