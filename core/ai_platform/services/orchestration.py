"""Orchestration: how one operation request runs, between the HTTP routes and the engine and limits.

The routes look an operation up here (:meth:`OrchestrationService.get`) and run it
(:meth:`~OrchestrationService.run`, :meth:`~OrchestrationService.open_stream`); they never
meet the engine (``ai_platform.engine_contract.Engine``) or the usage database themselves.
``ai-platform eval`` and ``selftest`` run examples through it too, with limits that count
nothing (``ai_platform.evaluation.runner``).

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

The engine knows tokens, not requests: a prompt too long for its context window (its
``PromptTooLongError``, from ``check`` or, after admission, from the model call) or for the
operation's ``Limits.max_input_tokens`` becomes here the seed's 422 pointing at the request
field that ``Operation.input_text`` read. The answer's token cap is decided here too, once
(``_output_limit``): the engine applies what it is given.

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
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from ai_platform.engine_contract import Engine, PromptTooLongError
from ai_platform.errors import NotFoundError, OperationError, PlatformError, RequestTimeoutError, RequestValidationError
from ai_platform.limits.service import RateLimit, Reservation
from ai_platform.operations import Choice, Choose, Completion, Generate, ModelCall, Operation, ResponseMeta
from ai_platform.timestamps import iso_timestamp

log = logging.getLogger(__name__)


class UsageLimits(Protocol):
    """The daily limits a request is admitted to (``LimitService``); each reservation is settled once."""

    async def admit(self, operation: str, key_id: str) -> Reservation:
        """A place in today's limits, or :class:`~ai_platform.errors.LimitExceededError`; safe to cancel."""
        ...

    async def commit(self, reservation: Reservation, *, tokens: int) -> None:
        """The request is served: count it (runs to its end even if the caller is cancelled)."""
        ...

    async def release(self, reservation: Reservation) -> None:
        """The request is not served: give its place back (a no-op once it is settled)."""
        ...


class ExecutionHooks(Protocol):
    """Where plugins may wrap an operation's own steps (``ai_platform.plugins.LoadedPlugins``)."""

    def build_model_call(self, operation: Operation, request: Any) -> Generate | Choose: ...

    def build_response(self, operation: Operation, request: Any, result: Any, meta: ResponseMeta) -> Any: ...

    def wraps_responses(self) -> bool:
        """Whether a plugin may change the response's text (streams then carry only the final event)."""
        ...


@dataclass(frozen=True)
class _Admitted:
    """A request that passed every check and holds its place in the limit."""

    call: ModelCall
    input_text: str
    loc: list[str]  # where the request holds ``input_text``, for a 422 the model raises after admission
    input_tokens: int | None  # the prompt's length in the model's tokens, if the engine counted it
    reservation: Reservation
    started: float  # time.perf_counter() at the request's start
    deadline: float | None  # the event loop's time when it times out (None: never)


@dataclass(frozen=True)
class Outcome:
    """A served request: its response, its cost, and the caller's limit after it."""

    response: Any
    output_tokens: int
    rate_limit: RateLimit
    input_tokens: int | None = None  # the prompt's tokens, where the engine counts them (OpenAI's usage)


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
    """The served operations, run on ``engine`` within ``limits``.

    ``timeout_seconds`` bounds each request from its start (``None``: no bound, for evaluation runs).
    """

    def __init__(
        self,
        operations: Mapping[str, Operation],
        engine: Engine,
        limits: UsageLimits,
        *,
        timeout_seconds: float | None = 300.0,
        hooks: ExecutionHooks,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.operations = operations
        self.engine = engine
        self.limits = limits
        self.timeout_seconds = timeout_seconds
        self.hooks = hooks
        self._clock = clock

    def get(self, name: str) -> Operation:
        """The operation called ``name``, or a 404 that lists those that exist."""
        try:
            return self.operations[name]
        except KeyError:
            available = ", ".join(sorted(self.operations)) or "none"
            raise NotFoundError(f"Unknown operation '{name}'. Available operations: {available}.") from None

    async def run(self, operation: Operation, request: Any, *, key_id: str) -> Outcome:
        """Execute one validated request for the caller with key id ``key_id``."""
        admitted = await self._admit(operation, request, key_id)
        try:
            async with self._model_step(admitted.deadline, admitted.loc):
                result = await self._call_model(operation, admitted.call)
            # Runs to its end even if the request is cancelled meanwhile (then counted: README, "API").
            return await self._settle(operation, request, admitted, result)
        except BaseException:
            # Failed, cancelled (client gone), timed out or not recorded: not a served request.
            # (After a commit that a cancellation interrupted, this finds nothing left to give back.)
            await self.limits.release(admitted.reservation)
            raise

    async def open_stream(
        self, operation: Operation, request: Any, *, key_id: str
    ) -> tuple[RateLimit, OperationStream]:
        """A request answered as a stream: everything that can refuse it runs now, as in :meth:`run`.

        Returns the caller's limit after admission and the :class:`OperationStream` of its
        text as it is decoded (only for operations with ``stream_deltas`` and no plugin
        wrapping ``build_response``), then its :class:`Outcome`, counted just before it is
        yielded. Closing the stream before that (even one never iterated) stops the
        generation and counts nothing.
        """
        admitted = await self._admit(operation, request, key_id)
        stream = OperationStream(
            self.limits, admitted.reservation, lambda stream: self._streamed(operation, request, admitted, stream)
        )
        return admitted.reservation.rate_limit, stream

    async def _streamed(
        self, operation: Operation, request: Any, admitted: _Admitted, stream: OperationStream
    ) -> AsyncGenerator[str | Outcome, None]:
        try:
            call = admitted.call
            deltas = operation.stream_deltas and not self.hooks.wraps_responses()
            if deltas and isinstance(call, Generate):
                pieces = self.engine.stream(operation.name, call, max_output_tokens=self._output_limit(operation, call))
                try:
                    while True:
                        async with self._model_step(admitted.deadline, admitted.loc):
                            item = await anext(pieces)
                        if not isinstance(item, str):
                            result: Completion | Choice = item
                            break
                        yield item
                finally:
                    await pieces.aclose()  # a no-op after the result; else the generation stops
            else:
                async with self._model_step(admitted.deadline, admitted.loc):
                    result = await self._call_model(operation, call)
            outcome = await self._settle(operation, request, admitted, result)
            stream.settled = True
            yield outcome
        finally:
            await stream.give_back()  # unless settled: abandoned, failed or timed out, not a served request

    async def _admit(self, operation: Operation, request: Any, key_id: str) -> _Admitted:
        """Everything that can refuse the request, then its place in the limit."""
        started = time.perf_counter()
        deadline = None if self.timeout_seconds is None else asyncio.get_running_loop().time() + self.timeout_seconds
        input_text = self._plugin_step(operation, "input_text", operation.input_text, request)
        loc = _input_loc(request, input_text)
        self._check_input(operation, input_text, loc)
        call = self._plugin_step(operation, "prompt", self.hooks.build_model_call, operation, request)
        self._check_call(operation, call)
        async with self._model_step(deadline, loc):
            input_tokens = await self._check_with_engine(operation, call, loc)
        reservation = await self.limits.admit(operation.name, key_id)  # cancellation-safe
        return _Admitted(call, input_text, loc, input_tokens, reservation, started, deadline)

    async def _settle(
        self, operation: Operation, request: Any, admitted: _Admitted, result: Completion | Choice
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
    async def _model_step(self, deadline: float | None, loc: list[str]) -> AsyncIterator[None]:
        """A call to the engine: the request's timeout (``REQUEST_TIMEOUT_SECONDS`` from its start)
        as a 504, and a prompt too long as the 422 naming the request field ``loc`` it came from."""
        try:
            async with asyncio.timeout_at(deadline):
                yield
        except TimeoutError:
            raise RequestTimeoutError(f"Request timed out after {self.timeout_seconds:g} seconds.") from None
        except PromptTooLongError as exc:
            # The engine knows the prompt's tokens, not where the request holds its input.
            raise exc.at(loc) from None

    @staticmethod
    def _check_input(operation: Operation, text: str, loc: list[str]) -> None:
        """The input text's own limits, for every operation (whichever field ``input_text`` read: ``loc``)."""
        # The request schema normally enforces the length already; this is the guarantee
        # for plugins whose schema does not.
        limit = operation.limits.max_input_chars
        if len(text) > limit:
            raise RequestValidationError.one(
                "string_too_long",
                f"String should have at most {limit} characters",
                loc=loc,
                input=text[:100] + "…",
            )
        if not text.strip():
            # Nothing for the model to work on: it would answer anyway, inventing one.
            raise RequestValidationError.one(
                "string_too_short",
                "String should have at least 1 non-whitespace character",
                loc=loc,
                input=text if len(text) <= 100 else text[:100] + "…",
            )

    @staticmethod
    def _check_call(operation: Operation, call: object) -> None:
        """A model call the engine can run at all (a plugin bug otherwise: a 500, before admission)."""
        if isinstance(call, Generate):
            problem = None if call.messages else "a Generate call without messages"
            if operation.limits.max_output_tokens is None:  # allowed only for operations that never generate
                problem = "a Generate call but has no limit max_output_tokens"
        elif isinstance(call, Choose):
            problem = None if call.messages and call.options else "a Choose call without messages or options"
        else:
            raise OperationError(f"Operation '{operation.name}' built an unsupported model call.")
        if problem is not None:
            log.error("operation %r built %s", operation.name, problem)
            raise OperationError(f"Operation '{operation.name}' failed.")

    async def _check_with_engine(self, operation: Operation, call: ModelCall, loc: list[str]) -> int | None:
        """The engine's own check, then the operation's token limit on the prompt it counted; the prompt's tokens.

        Asked before admission, so that a request that cannot run never holds a place in the
        limit; ``generate``/``choose`` may still refuse it after admission (an engine that cannot
        count, a prompt that grew), and it is then given its place back.
        """
        tokens = await self.engine.check(operation.name, call)
        limit = operation.limits.max_input_tokens
        if limit is not None and tokens is not None and tokens > limit:
            raise PromptTooLongError(tokens, limit, operation=operation.name, loc=loc)
        return tokens

    async def _call_model(self, operation: Operation, call: ModelCall) -> Completion | Choice:
        if isinstance(call, Generate):
            return await self.engine.generate(
                operation.name, call, max_output_tokens=self._output_limit(operation, call)
            )
        return await self.engine.choose(operation.name, call)

    @staticmethod
    def _output_limit(operation: Operation, call: Generate) -> int:
        """The final cap on the answer's tokens: the operation's limit, lowered by the call's own (never raised).

        Applied here only; the engine takes it as given (``Engine.generate``).
        """
        limit = operation.limits.max_output_tokens
        assert limit is not None  # _check_call refused the call otherwise
        return min(call.max_output_tokens or limit, limit)

    def _respond(self, operation: Operation, request: Any, result: Completion | Choice, meta: ResponseMeta) -> Any:
        response = self.hooks.build_response(operation, request, result, meta)
        if not isinstance(response, operation.response_type):
            raise TypeError(f"respond returned {type(response).__name__}")
        # Re-validate so a plugin bug surfaces here, named, instead of as a broken body.
        msgspec.convert(msgspec.to_builtins(response), operation.response_type)
        return response

    @staticmethod
    def _plugin_step(operation: Operation, step: str, function: Callable[..., Any], *args: Any) -> Any:
        """Run plugin code; its failures are logged with the operation's name and answered with a bare 500."""
        try:
            return function(*args)
        except PlatformError:
            raise
        except Exception as exc:
            log.exception("operation %r failed in %s", operation.name, step)
            raise OperationError(f"Operation '{operation.name}' failed.") from exc


class OperationStream:
    """An admitted request answered as a stream: its text as it is decoded, then its :class:`Outcome`.

    It holds ``reservation`` from its admission: committed when the ``Outcome`` is produced,
    given back otherwise, when the stream fails, when it is cancelled (its client hung up, it
    timed out) or when it is closed, even one never iterated (a client that hangs up between
    the admission and the first event: no generator body ever ran, so only :meth:`aclose` can
    give the place back).
    """

    def __init__(
        self,
        limits: UsageLimits,
        reservation: Reservation,
        events: Callable[[OperationStream], AsyncGenerator[str | Outcome, None]],
    ) -> None:
        self._limits = limits
        self._reservation = reservation
        self.settled = False  # committed or given back
        self._events = events(self)

    def __aiter__(self) -> OperationStream:
        return self

    async def __anext__(self) -> str | Outcome:
        return await anext(self._events)

    async def aclose(self) -> None:
        """Stop the generation, if it runs, and give the place back unless the request was counted."""
        try:
            await self._events.aclose()
        finally:
            await self.give_back()

    async def give_back(self) -> None:
        """Give the place back, once, unless the request was counted."""
        if not self.settled:
            self.settled = True  # whichever of the generator's end and aclose comes first
            await self._limits.release(self._reservation)
