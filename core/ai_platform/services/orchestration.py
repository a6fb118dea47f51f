"""Orchestration layer: model selection, limit enforcement, centralized error handling.

One request flows: its input checks (character limit, not blank) → the plugin's
prompt → the engine's check that the model is loaded and the prompt fits its
context window → atomic admission against the daily limit → the runtime → the
plugin's response. Whatever can refuse a request is asked before admission, so a
request that cannot run never holds a place in the limit, not even for a moment
(issue 11). A request is counted once if and only if it returns a response: its
reservation is committed last, and given back if anything before fails or the
request is cancelled (its client hung up, it timed out), wherever the
cancellation lands: ``LimitService`` runs admission and settlement to their end
in tasks of their own, and gives back an admission whose caller was cancelled.

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
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from ai_platform.errors import OperationError, PlatformError, RequestTimeoutError, RequestValidationError
from ai_platform.operations import Choice, Choose, Completion, Generate, ModelCall, Operation, ResponseMeta
from ai_platform.usage.limit_service import LimitService, RateLimit, Reservation

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the platform needs from the runtime (``ai_platform.runtime.engine.InferenceEngine``).

    An engine may also have ``check`` (:class:`CheckingEngine`): the orchestrator calls it,
    if present, before admitting a request.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def status(self) -> Sequence[Any]: ...

    def model_name(self, operation: str) -> str: ...

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion: ...

    async def choose(self, operation: str, call: Choose) -> Choice: ...


class CheckingEngine(Protocol):
    """The optional part of :class:`Engine`: refuse, before admission, a call that cannot run.

    ``check(operation, call)`` raises what ``generate``/``choose`` would raise for this
    ``call`` without doing model work: :class:`~ai_platform.errors.RequestValidationError`
    (the seed's 422: ``type`` ``string_too_long``, ``loc`` ``["body", "text"]``, ``msg``
    "Input is too long for the model's context window (N tokens; at most M).") when the
    prompt leaves no room for the answer (for ``Choose``: for its longest option), and
    :class:`~ai_platform.errors.ModelUnavailableError` when the operation's model is not
    loaded. It returns the prompt's length in tokens when the call may run (checked
    against ``Limits.max_input_tokens``; ``None`` if the engine cannot count). It must not wait for the
    model's queue (tokenizing is enough) and may be called concurrently. An engine without
    ``check`` is asked nothing: such a request is refused by ``generate``/``choose``
    instead, after admission (it holds a place while it waits, and is then given it back).
    """

    async def check(self, operation: str, call: ModelCall) -> int | None: ...


class ExecutionHooks(Protocol):
    """Where plugins may wrap an operation's own steps (``ai_platform.plugins.LoadedPlugins``)."""

    def build_model_call(self, operation: Operation, request: Any) -> Generate | Choose: ...  # type: ignore[type-arg]

    def build_response(self, operation: Operation, request: Any, result: Any, meta: ResponseMeta) -> Any: ...  # type: ignore[type-arg]

    def wraps_responses(self) -> bool:
        """Whether a plugin may change the response's text (streams then carry only the final event)."""
        ...


@dataclass(frozen=True)
class _Admitted:
    """A request that passed every check and holds its place in the limit."""

    call: ModelCall
    input_text: str
    input_tokens: int | None  # the prompt's length in the model's tokens, if the engine counted it
    reservation: Reservation
    started: float  # time.perf_counter() at the request's start
    deadline: float  # the event loop's time when it times out


@dataclass(frozen=True)
class Outcome:
    """A served request: its response, its cost, and the caller's limit after it."""

    response: Any
    output_tokens: int
    rate_limit: RateLimit
    input_tokens: int | None = None  # the prompt's tokens, where the engine counts them (OpenAI's usage)


def iso_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``, as in the seed (``2025-01-15T10:30:00.000Z``)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _input_loc(request: Any, text: str) -> list[str]:
    """Where ``operation.input_text`` read ``text`` in the body, for a 422's ``loc``.

    The request's top-level string field holding exactly ``text`` (``text`` for the
    default ``input_text``), or the body itself if ``input_text`` composes it.
    """
    if isinstance(getattr(request, "text", None), str) and request.text == text:
        return ["body", "text"]
    if isinstance(request, msgspec.Struct):
        for field in msgspec.structs.fields(request):
            if getattr(request, field.name, None) == text:
                return ["body", field.encode_name]
    return ["body"]


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
        admitted = await self._admit(operation, request, key_id)
        try:
            async with self._deadline(admitted.deadline):
                result = await self._call_model(operation, admitted.call)
            # Runs to its end even if the request is cancelled meanwhile (then counted: README, "API").
            return await self._settle(operation, request, admitted, result)
        except BaseException:
            # Failed, cancelled (client gone), timed out or not recorded: not a served request.
            # (After a commit that a cancellation interrupted, this finds nothing left to give back.)
            await self.limits.release(admitted.reservation)
            raise

    async def open_stream(
        self,
        operation: Operation,  # type: ignore[type-arg]
        request: Any,
        *,
        key_id: str,
    ) -> tuple[RateLimit, AsyncGenerator[str | Outcome, None]]:
        """A request answered as a stream: everything that can refuse it runs now, as in :meth:`run`.

        Returns the caller's limit after admission and an iterator of the text as it is
        decoded (only for operations with ``stream_deltas`` and no plugin wrapping
        ``build_response``), then the :class:`Outcome`, counted just before it is yielded.
        Closing the iterator before that stops the generation and counts nothing.
        """
        admitted = await self._admit(operation, request, key_id)
        return admitted.reservation.rate_limit, self._streamed(operation, request, admitted)

    async def _streamed(
        self,
        operation: Operation,  # type: ignore[type-arg]
        request: Any,
        admitted: _Admitted,
    ) -> AsyncGenerator[str | Outcome, None]:
        settled = False
        try:
            call = admitted.call
            stream = getattr(self.engine, "stream", None)
            deltas = operation.stream_deltas and not self.hooks.wraps_responses()
            if deltas and stream is not None and isinstance(call, Generate):
                pieces: AsyncGenerator[str | Completion, None] = stream(
                    operation.name, call, max_output_tokens=self._output_limit(operation, call)
                )
                try:
                    while True:
                        async with self._deadline(admitted.deadline):
                            item = await anext(pieces)
                        if not isinstance(item, str):
                            result: Completion | Choice = item
                            break
                        yield item
                finally:
                    await pieces.aclose()  # a no-op after the result; else the generation stops
            else:
                async with self._deadline(admitted.deadline):
                    result = await self._call_model(operation, call)
            outcome = await self._settle(operation, request, admitted, result)
            settled = True
            yield outcome
        finally:
            if not settled:  # abandoned, failed or timed out: not a served request
                await self.limits.release(admitted.reservation)

    async def _admit(self, operation: Operation, request: Any, key_id: str) -> _Admitted:  # type: ignore[type-arg]
        """Everything that can refuse the request, then its place in the limit."""
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.timeout_seconds
        input_text = self._plugin_step(operation, "input_text", operation.input_text, request)
        self._check_input(operation, request, input_text)
        call = self._plugin_step(operation, "prompt", self.hooks.build_model_call, operation, request)
        self._check_call(operation, call)
        async with self._deadline(deadline):
            input_tokens = await self._check_with_engine(operation, call, _input_loc(request, input_text))
        reservation = await self.limits.admit(operation.name, key_id)  # cancellation-safe
        return _Admitted(call, input_text, input_tokens, reservation, started, deadline)

    async def _settle(
        self,
        operation: Operation,  # type: ignore[type-arg]
        request: Any,
        admitted: _Admitted,
        result: Completion | Choice,
    ) -> Outcome:
        """The response for the model's result, counted."""
        meta = ResponseMeta(
            operation=operation.name,
            model_used=self.engine.model_name(operation.name),
            input_chars=len(admitted.input_text),
            output_tokens=result.output_tokens,
            execution_time_ms=round((time.perf_counter() - admitted.started) * 1000, 1),
            request_id=getattr(request, "request_id", None),
            timestamp=iso_timestamp(self._clock()),
        )
        response = self._plugin_step(operation, "respond", self._respond, operation, request, result, meta)
        await self.limits.commit(admitted.reservation, tokens=result.output_tokens)
        return Outcome(response, result.output_tokens, admitted.reservation.rate_limit, admitted.input_tokens)

    @asynccontextmanager
    async def _deadline(self, deadline: float) -> AsyncIterator[None]:
        """The request's timeout (``REQUEST_TIMEOUT_SECONDS`` from its start), as a 504."""
        try:
            async with asyncio.timeout_at(deadline):
                yield
        except TimeoutError:
            raise RequestTimeoutError(f"Request timed out after {self.timeout_seconds:g} seconds.") from None

    @staticmethod
    def _check_input(operation: Operation, request: Any, text: str) -> None:  # type: ignore[type-arg]
        """The input text's own limits, for every operation (whichever field ``input_text`` reads)."""
        # The request schema normally enforces the length already; this is the guarantee
        # for plugins whose schema does not.
        limit = operation.limits.max_input_chars
        if len(text) > limit:
            raise RequestValidationError.one(
                "string_too_long",
                f"String should have at most {limit} characters",
                loc=_input_loc(request, text),
                input=text[:100] + "…",
            )
        if not text.strip():
            # Nothing for the model to work on: it would answer anyway, inventing one.
            raise RequestValidationError.one(
                "string_too_short",
                "String should have at least 1 non-whitespace character",
                loc=_input_loc(request, text),
                input=text if len(text) <= 100 else text[:100] + "…",
            )

    @staticmethod
    def _check_call(operation: Operation, call: object) -> None:  # type: ignore[type-arg]
        """A model call the engine can run at all (a plugin bug otherwise: a 500, before admission)."""
        if isinstance(call, Generate):
            problem = None if call.messages else "a Generate call without messages"
        elif isinstance(call, Choose):
            problem = None if call.messages and call.options else "a Choose call without messages or options"
        else:
            raise OperationError(f"Operation '{operation.name}' built an unsupported model call.")
        if problem is not None:
            log.error("operation %r built %s", operation.name, problem)
            raise OperationError(f"Operation '{operation.name}' failed.")

    async def _check_with_engine(self, operation: Operation, call: ModelCall, loc: list[str]) -> int | None:  # type: ignore[type-arg]
        """The engine's own check, then the operation's token limit on the prompt it counted; the prompt's tokens."""
        check = getattr(self.engine, "check", None)
        if check is None:
            return None
        tokens = await check(operation.name, call)
        limit = operation.limits.max_input_tokens
        if limit is not None and isinstance(tokens, int) and tokens > limit:
            raise RequestValidationError.one(
                "string_too_long",
                f"Input is too long for operation '{operation.name}': its prompt is {tokens} tokens; at most {limit}.",
                loc=loc,
            )
        return tokens if isinstance(tokens, int) else None

    async def _call_model(self, operation: Operation, call: ModelCall) -> Completion | Choice:  # type: ignore[type-arg]
        if isinstance(call, Generate):
            return await self.engine.generate(
                operation.name, call, max_output_tokens=self._output_limit(operation, call)
            )
        return await self.engine.choose(operation.name, call)

    @staticmethod
    def _output_limit(operation: Operation, call: Generate) -> int:  # type: ignore[type-arg]
        limit = operation.limits.max_output_tokens
        return min(call.max_output_tokens or limit, limit)

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
