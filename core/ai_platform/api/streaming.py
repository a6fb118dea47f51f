"""Operations answered as Server-Sent Events, for clients that send ``"stream": true`` or ``Accept: text/event-stream``.

``stream`` belongs to the platform, not to the operation: each operation's route accepts its
request type plus ``stream`` (:func:`streamable`; still no unknown field, and ``stream`` must be
a boolean, else 422), and the operation gets its own request type without it. Given in the
body, ``stream`` decides (``false`` answers JSON whatever ``Accept`` says); without it,
``Accept: text/event-stream`` asks for a stream.

Everything that can refuse a request (key, validation, limits, a model that is not loaded)
answers before the stream starts, as plain JSON with its status code. The stream then
carries ``delta`` events (``{"text": ...}``: the answer's text as it is decoded, for
operations whose text is not post-processed) and ends with one ``result`` event holding
exactly the body the non-streaming call returns (``meta`` included), or one ``error`` event
holding the seed's error body (``{"detail": ...}``, with its ``status``). A request is
counted when its ``result`` is produced; a client that hangs up before that is not counted,
and its generation stops at the model's next step.

A stream's response starts with status 200 before its outcome is known, so the audit trail
and ``/metrics`` record how it ended instead (:func:`stream_ended`, read by
``AuditMiddleware``): 200 once its ``result`` is produced (counted), the ``error`` event's
status, or 499 (nginx's "client closed request") for a stream the client abandoned.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Annotated, Any

import msgspec
from litestar import Request
from litestar.background_tasks import BackgroundTask
from litestar.response import ServerSentEvent, ServerSentEventMessage
from msgspec import UNSET, UnsetType

from ai_platform.api.errors import error_body
from ai_platform.errors import PlatformError
from ai_platform.services.orchestration import OperationStream

log = logging.getLogger(__name__)

EVENT_STREAM = "text/event-stream"

# Where a stream records how it ended, in the request's state (the ASGI scope's "state"), for
# ``AuditMiddleware``: the status it prefers over the response's 200.
STREAM_STATUS = "stream_status"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request its client abandoned


STREAM_FIELD = "stream"
StreamField = Annotated[
    bool | UnsetType,
    msgspec.Meta(description="true: answer as Server-Sent Events; false: as JSON. Not given: as `Accept` asks."),
]


def streamable(request_type: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """``request_type`` with the optional boolean ``stream`` field: the body an operation's route accepts.

    Named as ``request_type``, so the OpenAPI document and generated clients keep the operation's
    names. An operation's request type may not have a ``stream`` field of its own
    (``Operation.validate``).
    """
    return msgspec.defstruct(
        request_type.__name__,
        [(STREAM_FIELD, StreamField, UNSET)],
        bases=(request_type,),
        module=request_type.__module__,
        kw_only=True,
    )


def without_stream(body: Any, request_type: type[msgspec.Struct]) -> Any:
    """The operation's own request: ``body`` (a :func:`streamable` instance) without ``stream``."""
    return request_type(**{name: getattr(body, name) for name in request_type.__struct_fields__})


def wants_stream(request: Request[Any, Any, Any], body: Any) -> bool:
    """The client asked for Server-Sent Events: ``"stream": true``, or no ``stream`` and ``Accept: text/event-stream``."""
    stream = getattr(body, STREAM_FIELD, UNSET)
    if stream is not UNSET:
        return bool(stream)
    return EVENT_STREAM in request.headers.get("accept", "")


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _error_body(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, PlatformError):
        return {"status": exc.status_code, **error_body(exc)}
    log.exception("stream failed", exc_info=exc)
    return {"status": 500, "detail": "Internal server error."}


def stream_ended(request: Request[Any, Any, Any], status: int) -> None:
    """Record how the stream of ``request`` ended (200: its result was produced), for the audit trail."""
    request.state[STREAM_STATUS] = status


def event_stream(
    request: Request[Any, Any, Any],
    events: OperationStream,
    messages: AsyncGenerator[ServerSentEventMessage, None],
    headers: dict[str, str],
) -> ServerSentEvent:
    """The response streaming ``messages`` (made from ``events``), audited as abandoned (499) until they end.

    ``events`` is closed once the response is over, however it went: a client that hangs up
    before the first event cancels the response before ``messages`` ever starts (Litestar
    then never closes it), and the place ``events`` holds in the limit must still be given back
    at once, not when its lease ends.
    """
    stream_ended(request, CLIENT_CLOSED_REQUEST)
    return ServerSentEvent(messages, headers=headers, background=BackgroundTask(events.aclose))


async def sse_events(
    request: Request[Any, Any, Any], events: OperationStream
) -> AsyncGenerator[ServerSentEventMessage, None]:
    """The stream's events, its end recorded for the audit trail (:func:`stream_ended`).

    The response went out as 200 before the outcome was known; the audit trail and ``/metrics``
    record 200 once the ``result`` is produced (the request is then counted), the ``error``
    event's status, or 499 if the client hangs up before either (set by :func:`event_stream`).
    """
    try:
        async for event in events:
            if isinstance(event, str):
                # str(): a TextDelta (with logprobs; msgspec encodes only plain str) is its text here.
                yield ServerSentEventMessage(event="delta", data=_json({"text": str(event)}))
            else:
                request.state.output_tokens = event.output_tokens
                stream_ended(request, 200)
                yield ServerSentEventMessage(event="result", data=_json(event.response))
    except Exception as exc:  # after the 200 went out: the error travels as the stream's last event
        body = _error_body(exc)
        stream_ended(request, body["status"])
        yield ServerSentEventMessage(event="error", data=_json(body))
    finally:
        await events.aclose()
