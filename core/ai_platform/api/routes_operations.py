"""``POST /operations/{name}``: one route per operation, each with its own schemas in OpenAPI."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath, JSONBody

from ai_platform.api.auth import Principal
from ai_platform.api.disconnect import cancel_on_disconnect
from ai_platform.api.openapi_responses import operation_documented
from ai_platform.api.streaming import event_stream, sse_events, streamable, wants_stream, without_stream
from ai_platform.api.validation import shorten
from ai_platform.operations import NAME_PATTERN, Operation
from ai_platform.services.orchestration import OrchestrationService

UNAVAILABLE = (
    503,
    "The operation's model is not loaded, its queue is full, or the usage database is unreachable; "
    "retry after `Retry-After`.",
)


def operation_route(operation: Operation, service: OrchestrationService) -> HTTPRouteHandler:
    """Build the route handler of one operation."""

    body_type = streamable(operation.request_type)

    async def handler(request: Request[Any, Any, Any], data: Any) -> Any:
        request.state.request_id = getattr(data, "request_id", None)
        caller: Principal = request.user
        body = without_stream(data, operation.request_type)
        if wants_stream(request, data):
            opened = service.open_stream(operation, body, key_id=caller.key_id)
            rate_limit, events = await cancel_on_disconnect(request, opened)  # refusals: plain JSON, as always
            return event_stream(request, events, sse_events(request, events), rate_limit.headers())
        outcome = await cancel_on_disconnect(request, service.run(operation, body, key_id=caller.key_id))
        request.state.output_tokens = outcome.output_tokens
        return Response(outcome.response, headers=outcome.rate_limit.headers())

    # The annotations carry the operation's own types (its request with ``stream``), so Litestar
    # validates the body and documents both schemas per operation.
    handler.__annotations__ = {
        "request": Request[Any, Any, Any],
        "data": JSONBody[body_type],  # type: ignore[misc,valid-type]
        "return": Response[operation.response_type],  # type: ignore[name-defined]
    }
    handler.__name__ = f"operation_{operation.name}"
    return post(
        f"/operations/{operation.name}",
        status_code=200,
        summary=operation.summary,
        operation_id=f"operation_{operation.name}",
        tags=["operations"],
        opt={"operation": operation.name, "body_type": body_type},
        **operation_documented(403, 413, 415, 422, 429, 500, UNAVAILABLE, 504),
    )(handler)


def unknown_operation_route(service: OrchestrationService) -> HTTPRouteHandler:
    """Any other ``/operations/{name}``: a 404 that lists what exists."""

    @post("/operations/{name:str}", status_code=200, include_in_schema=False)
    async def unknown_operation(name: FromPath[str]) -> None:
        # Known operations have their own static route, which wins; this raises NotFoundError.
        # A name no operation can have is echoed cut to 64 characters, control characters escaped
        # (still no operation's name: it ends in "…", holds a backslash, or is the name unchanged).
        service.get(name if NAME_PATTERN.match(name) else shorten(name, 64))

    return unknown_operation
