"""The one place where exceptions become HTTP responses, in the seed's wire format.

422: ``{"error": "Request validation failed.", "detail": [...]}``; every other
error: ``{"detail": "..."}`` with the error's own headers (503s and 429s carry
``Retry-After``). Unknown exceptions become a 500 whose body says nothing
about the cause.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from ai_platform.errors import PlatformError, RequestValidationError

log = logging.getLogger(__name__)

VALIDATION_MESSAGE = "Request validation failed."


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(content=body, status_code=status, headers=headers, media_type="application/json")


def status_for(exc: BaseException) -> int:
    """The HTTP status an exception is answered with (also used by the audit trail)."""
    if isinstance(exc, ValidationException):
        return 422
    if isinstance(exc, PlatformError | HTTPException):
        return exc.status_code
    return 500


def validation_body(errors: list[dict[str, object]]) -> dict[str, Any]:
    """The seed's 422 body: ``{"error": "Request validation failed.", "detail": [{"type", "loc", "msg", "input"}]}``."""
    return {"error": VALIDATION_MESSAGE, "detail": errors}


def error_body(exc: PlatformError) -> dict[str, Any]:
    """The seed's body for ``exc``, whether it answers a request or ends a stream (``api/streaming.py``).

    A :class:`RequestValidationError` (``PromptTooLongError`` included) has the 422 body, every
    other error ``{"detail": "..."}``; ``/v1`` maps this to OpenAI's format (``api/openai_compat.py``).
    """
    if isinstance(exc, RequestValidationError):
        return validation_body(exc.errors)
    return {"detail": exc.detail}


def platform_error(request: Request[Any, Any, Any], exc: PlatformError) -> Response[Any]:
    return _json(exc.status_code, error_body(exc), exc.headers or None)


def validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    # Bodies are validated earlier (``validation.validate_body``); this covers path and query parameters.
    extra = exc.extra if isinstance(exc.extra, list) else []
    details = [
        {
            "type": "value_error",
            "loc": [e.get("source", "query"), e.get("key", "")],
            "msg": e.get("message"),
            "input": None,
        }
        for e in extra
        if isinstance(e, dict)
    ] or [{"type": "value_error", "loc": [], "msg": exc.detail, "input": None}]
    return _json(422, validation_body(details))


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _json(exc.status_code, {"detail": exc.detail}, exc.headers)


def unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    handler = request.scope.get("route_handler")
    log.error(
        "unhandled error on %s %s (operation=%s)",
        request.method,
        request.url.path,
        handler.opt.get("operation") if handler is not None else None,
        exc_info=exc,
    )
    return _json(500, {"detail": "Internal server error."})


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    PlatformError: platform_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    Exception: unexpected_error,
}
