"""What the OpenAPI document says each route answers besides its success: the real error bodies and headers.

Every route lists the error statuses it can return (:func:`documented`), each with the body that
``api.errors`` really sends: 422 ``{"error": "Request validation failed.", "detail": [...]}``, every
other error ``{"detail": "..."}``; ``/v1``'s routes pass their own body (OpenAI's, ``api.openai_compat``),
and list 400 where they answer a body that does not validate. 429s carry ``Retry-After`` and
``X-RateLimit-*``, 503s ``Retry-After``, and an operation's 200 ``X-RateLimit-*``. Litestar's own 400
for validation errors is not listed: here they are answered 422 (``api.errors.validation_error``), or
400 with OpenAI's body on ``/v1``.

Refusals of requests that reach no route are not part of any operation: the document's
description tells them (:data:`TRANSPORT_ERRORS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    Schema,
)

from ai_platform.api.streaming import EVENT_STREAM

TRANSPORT_ERRORS = (
    "Besides the statuses each operation lists, requests that reach no operation are refused, all with "
    '`{"detail": "..."}` but the first: a request the HTTP server cannot parse 400 (plain text), an invalid '
    "`Host` header 400, a request head over 100 header fields or 64 KiB 431 (`ai-platform serve`), an unknown "
    "path 404 (`POST /operations/{name}` for a name no operation has: 404 naming the available ones), a known "
    "path with another method 405."
)


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every error but a validation error."""

    detail: str


class ValidationErrorDetail(msgspec.Struct, kw_only=True):
    """One problem with the request, in pydantic's terms (``type`` such as ``missing``, ``string_too_long``)."""

    type: str
    loc: list[str | int]  # where: "body", "query" or "path", then the field names and list indexes
    msg: str
    input: Any  # the offending value (long ones shortened), or null


class ValidationErrorResponse(msgspec.Struct, kw_only=True):
    """A request that does not match its schema: the seed's 422 body."""

    error: str  # always "Request validation failed."
    detail: list[ValidationErrorDetail]


DESCRIPTIONS = {
    403: "Missing or unknown `X-API-Key`, or a client key where an admin key is needed.",
    404: "Not found.",
    413: "Body over 256 KB.",
    415: "Body not sent as JSON (`Content-Type: application/json`, UTF-8).",
    422: "The body (or a parameter) does not match its schema, or is not JSON.",
    429: "A daily limit is used up: the operation's, or the API key's quota on it. Retry after `Retry-After`.",
    500: "An unexpected failure; the body says nothing of its cause.",
    502: "The operation's remote engine failed or answered something invalid; the body names the engine.",
    503: "The usage database is unreachable; retry after `Retry-After`.",
    504: "The request ran longer than `REQUEST_TIMEOUT_SECONDS`; its generation was stopped.",
}


def _header(description: str) -> OpenAPIHeader:
    return OpenAPIHeader(schema=Schema(type=OpenAPIType.INTEGER), description=description, required=True)


RETRY_AFTER = {"Retry-After": _header("Seconds to wait before trying again.")}
RATE_LIMIT = {
    "X-RateLimit-Limit": _header("Requests a day: the tighter of the operation's daily limit and the key's quota."),
    "X-RateLimit-Remaining": _header("Requests left today under that limit."),
    "X-RateLimit-Reset": _header("Seconds until the limit day ends (midnight in LIMIT_TIMEZONE)."),
}
HEADERS = {"429": {**RETRY_AFTER, **RATE_LIMIT}, "503": RETRY_AFTER}


Status = int | tuple[int, str]
"""A documented error status, or a status and its description (else :data:`DESCRIPTIONS`'s)."""


def documented(
    *statuses: Status, body: type[msgspec.Struct] | None = None, operation_class: type[Operation] | None = None
) -> dict[str, Any]:
    """A route's keyword arguments that document its error statuses.

    ``responses`` gives each its real body: ``body`` for all where the route has an error format of
    its own (``/v1``), else 422's :class:`ValidationErrorResponse` and the others' :class:`ErrorResponse`;
    ``operation_class`` (a :class:`PlatformOperation`) adds the headers and drops Litestar's 400.
    """
    responses: dict[int, ResponseSpec] = {}
    for entry in statuses:
        status, description = entry if isinstance(entry, tuple) else (entry, DESCRIPTIONS[entry])
        error = body or (ValidationErrorResponse if status == 422 else ErrorResponse)
        responses[status] = ResponseSpec(data_container=error, description=description, generate_examples=False)
    return {"responses": responses, "operation_class": operation_class or PlatformOperation}


@dataclass
class PlatformOperation(Operation):
    """An OpenAPI operation as this server answers it: error headers added, Litestar's 400 removed."""

    def __post_init__(self) -> None:
        responses: dict[str, Any] = self.responses or {}
        if _is_litestars_400(responses.get("400")):
            del responses["400"]  # Litestar's ValidationException: answered 422 here (400 on /v1), documented so
        for status, headers in HEADERS.items():
            if isinstance(response := responses.get(status), OpenAPIResponse):
                response.headers = {**(response.headers or {}), **headers}
        for response in responses.values():
            for media in (getattr(response, "content", None) or {}).values():
                # Litestar documents a returned union as oneOf; a body of one of its subtypes (an admin's
                # /health holds every field of the public one) matches several: anyOf is what is true.
                if isinstance(media.schema, Schema) and media.schema.one_of:
                    media.schema.any_of, media.schema.one_of = media.schema.one_of, None


def _is_litestars_400(response: Any) -> bool:
    """Whether ``response`` is the 400 Litestar adds to a route with parameters (``{status_code, detail, extra}``),
    not one that :func:`documented` listed (whose body is a component, ``$ref``)."""
    content = getattr(response, "content", None) or {}
    return response is not None and not any(isinstance(media.schema, Reference) for media in content.values())


STREAM_DESCRIPTION = (
    'With `Accept: text/event-stream` or `"stream": true` in the body: Server-Sent Events. `delta` events '
    '(`{"text": "..."}`, the text as it is decoded, for operations that return it unchanged), then one '
    "`result` event holding the JSON body above, or one `error` event (the error body with its `status`)."
)


@dataclass
class StreamingOperation(PlatformOperation):
    """An operation route: its 200 is JSON or Server-Sent Events, and carries ``X-RateLimit-*``.

    A subclass may say what its stream holds (``stream_description``) and add headers to its 200.
    """

    stream_description: ClassVar[str] = STREAM_DESCRIPTION
    success_headers: ClassVar[dict[str, OpenAPIHeader]] = {}

    def __post_init__(self) -> None:
        super().__post_init__()
        success = (self.responses or {}).get("200")
        if isinstance(success, OpenAPIResponse):
            success.headers = {**(success.headers or {}), **RATE_LIMIT, **self.success_headers}
            stream = Schema(type=OpenAPIType.STRING, description=self.stream_description)
            success.content = {**(success.content or {}), EVENT_STREAM: OpenAPIMediaType(schema=stream)}


def operation_documented(
    *statuses: Status, body: type[msgspec.Struct] | None = None, operation_class: type[StreamingOperation] | None = None
) -> dict[str, Any]:
    """:func:`documented` for a route that runs an operation (a :class:`StreamingOperation`), with 502: any
    operation may be served by a remote engine (``OPERATION_MODEL_MAP``)."""
    if not any((entry if isinstance(entry, int) else entry[0]) == 502 for entry in statuses):
        statuses = (*statuses, 502)
    return documented(*statuses, body=body, operation_class=operation_class or StreamingOperation)
