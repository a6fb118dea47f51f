"""The OpenAI-compatible API: ``POST /v1/chat/completions`` and ``GET /v1/models``, for OpenAI's clients.

Served only with ``OPENAI_API=true``, by the operation ``chat`` (``ai_platform.chat``): a
completion goes through the same orchestration as ``POST /operations/chat`` (refusals before
admission, daily limit and key quota, counted once when it succeeds, not when it fails or
its stream is abandoned, audited as ``chat``); this module only speaks OpenAI's wire format.
The key may come as ``Authorization: Bearer KEY`` (what OpenAI's clients send) or ``X-API-Key``.

Errors on ``/v1`` have OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, so that
its clients raise their own exceptions with the message: a body that does not validate is 400
(``code``: the pydantic-style type, e.g. ``extra_forbidden``, or ``context_length_exceeded``; ``param``:
the field), an unknown ``model`` 404 ``model_not_found``; 403, 413, 415, 429, 500, 503 and 504 keep
their statuses and headers (``Retry-After``, ``X-RateLimit-*``). A stream that fails after it has
started ends with one ``data:`` event holding such an error body.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.spec import OpenAPIHeader, OpenAPIType, Schema
from litestar.params import FromPath, JSONBody
from litestar.response import ServerSentEventMessage
from litestar.types import ExceptionHandlersMap
from msgspec import UNSET, UnsetType

from ai_platform import chat
from ai_platform.api.auth import Principal
from ai_platform.api.disconnect import cancel_on_disconnect
from ai_platform.api.errors import EXCEPTION_HANDLERS as APP_EXCEPTION_HANDLERS
from ai_platform.api.errors import error_body
from ai_platform.api.openapi_responses import DESCRIPTIONS, Status, StreamingOperation, documented, operation_documented
from ai_platform.api.streaming import event_stream, stream_ended
from ai_platform.engine_contract import Engine, PromptTooLongError
from ai_platform.errors import NotFoundError, PlatformError, RequestValidationError
from ai_platform.operations import TokenLogprob
from ai_platform.services.orchestration import OperationStream, OrchestrationService, Outcome

log = logging.getLogger(__name__)

PREFIX = "/v1"
OWNER = "ai-platform"


# --- the wire format -----------------------------------------------------------------------


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False  # a last chunk with usage and no choices


class ChatCompletionRequest(chat.ChatRequest, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's chat request, as far as this server serves it (``chat.ChatRequest`` plus the route's fields)."""

    model: str  # the id GET /v1/models lists
    stream: bool = False
    stream_options: StreamOptions | None = None


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"]
    content: str


class ChoiceLogprobs(msgspec.Struct, kw_only=True):
    """``logprobs: true``: the answer's tokens, each with its log-probability and the ``top_logprobs`` likeliest."""

    content: list[TokenLogprob] | None


class Choice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None  # with logprobs: true, the tokens of this chunk's text


class ChatCompletionChunk(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | UnsetType = UNSET


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error on ``/v1``, in OpenAI's format."""

    error: ErrorDetail


# --- errors --------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 403: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
               504: "timeout_error"}  # fmt: skip
ERROR_CODES = {403: "invalid_api_key", 413: "request_too_large", 415: "unsupported_media_type",
               429: "rate_limit_exceeded", 503: "service_unavailable", 504: "timeout"}  # fmt: skip


class ModelNotFoundError(NotFoundError):
    """A ``model`` this server does not serve."""


def _error_body(exc: BaseException) -> tuple[int, ErrorBody, dict[str, str]]:
    """The status, OpenAI error body and headers of ``exc``."""
    param: str | None = None
    headers: dict[str, str] = {}
    if isinstance(exc, RequestValidationError):
        status = 400
        first = error_body(exc)["detail"][0]  # the seed's 422 body, in OpenAI's terms
        where = first.get("loc")
        param = ".".join(str(part) for part in where[1:]) if isinstance(where, list) else ""
        param = param or None
        code: str | None = str(first.get("type"))
        message = str(first.get("msg"))
        if code == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif isinstance(exc, PromptTooLongError):  # the model's context window, or the operation's token limit
            code = "context_length_exceeded"
        elif param is not None and not message.startswith(param):
            message = f"{param}: {message}"
    elif isinstance(exc, PlatformError):
        status, message, headers = exc.status_code, exc.detail, exc.headers
        code = "model_not_found" if isinstance(exc, ModelNotFoundError) else ERROR_CODES.get(status)
    elif isinstance(exc, ValidationException):
        status, message, code = 400, str(exc.detail), "invalid_value"
    elif isinstance(exc, HTTPException):
        status, message, code = exc.status_code, str(exc.detail), ERROR_CODES.get(exc.status_code)
        headers = dict(exc.headers or {})
    else:
        status, message, code = 500, "Internal server error.", None
    kind = ERROR_TYPES.get(status, "server_error")
    return status, ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code)), headers


def _openai_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    status, body, headers = _error_body(exc)
    if status == 500:
        log.error("unhandled error on %s %s (operation=%s)", request.method, request.url.path, chat.NAME, exc_info=exc)
    return Response(body, status_code=status, headers=headers or None, media_type="application/json")


# Every class the app maps (api/errors.py), mapped again: Litestar picks a handler by the exception's
# class hierarchy across all layers, so the app's PlatformError handler would win over a router's Exception one.
EXCEPTION_HANDLERS: ExceptionHandlersMap = dict.fromkeys(APP_EXCEPTION_HANDLERS, _openai_error)

DOCUMENTED = {
    400: "The body does not match the schema (OpenAI's error body: `code` and `param` say what and where).",
    403: "Missing or unknown API key (`Authorization: Bearer KEY` or `X-API-Key`).",
    404: "`model` is not the one `GET /v1/models` lists.",
    429: "The daily limit of operation `chat`, or the key's quota on it, is used up. Retry after `Retry-After`.",
    503: "The model is not loaded or its queue is full, or the usage database is unreachable; retry after "
    "`Retry-After`.",
}  # the other statuses: as on every route (openapi_responses.DESCRIPTIONS)


def _errors(*statuses: Status) -> tuple[Status, ...]:
    """``statuses`` with their descriptions on ``/v1``, for ``openapi_responses.documented`` (with ``body=ErrorBody``)."""
    return tuple(s if isinstance(s, tuple) else (s, DOCUMENTED.get(s) or DESCRIPTIONS[s]) for s in statuses)


@dataclass
class ChatCompletionsOperation(StreamingOperation):
    """``POST /v1/chat/completions`` in OpenAPI: its stream is OpenAI's chunks, its 200 names the completion."""

    stream_description: ClassVar[str] = (
        'With `"stream": true`: Server-Sent Events as OpenAI sends them, `data:` lines only. Each holds a '
        "`chat.completion.chunk` (`ChatCompletion`'s fields, `choices[].delta` for `message`): the role, the text as "
        "it is decoded, then the `finish_reason` (and with `stream_options.include_usage` one chunk with `usage` and "
        "no choices); then `data: [DONE]`. An error after the stream has started is its last `data:` line, an "
        "`ErrorBody`."
    )
    success_headers: ClassVar[dict[str, OpenAPIHeader]] = {
        "X-Request-Id": OpenAPIHeader(
            schema=Schema(type=OpenAPIType.STRING), description="The completion's `id`.", required=True
        )
    }


# --- the routes ----------------------------------------------------------------------------


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _usage(outcome: Outcome) -> Usage:
    prompt = outcome.input_tokens or 0
    return Usage(
        prompt_tokens=prompt, completion_tokens=outcome.output_tokens, total_tokens=prompt + outcome.output_tokens
    )


def _as_operation_request(body: ChatCompletionRequest) -> chat.ChatRequest:
    return chat.ChatRequest(**{name: getattr(body, name) for name in chat.ChatRequest.__struct_fields__})


async def _chunks(
    request: Request[Any, Any, Any],
    events: OperationStream,
    template: ChatCompletionChunk,
    include_usage: bool,
) -> AsyncGenerator[ServerSentEventMessage, None]:
    """OpenAI's chunks: the role, the text as it is decoded, the finish reason, usage if asked, ``[DONE]``."""

    def chunk(delta: Delta, finish_reason: Any = None, logprobs: Any = None) -> ServerSentEventMessage:
        content = None if logprobs is None else ChoiceLogprobs(content=list(logprobs))
        choice = ChunkChoice(index=0, delta=delta, finish_reason=finish_reason, logprobs=content)
        return ServerSentEventMessage(data=_json(msgspec.structs.replace(template, choices=[choice])))

    try:
        yield chunk(Delta(role="assistant", content=""))
        streamed = False
        async for event in events:
            if isinstance(event, str):
                streamed = True
                yield chunk(Delta(content=str(event)), logprobs=getattr(event, "logprobs", None))  # a TextDelta's
                continue
            request.state.output_tokens = event.output_tokens
            stream_ended(request, 200)  # counted: audited as served, whether or not the last chunks arrive
            response: chat.ChatResponse = event.response
            if not streamed and response.content:  # no deltas (a plugin wraps responses): the whole text
                yield chunk(Delta(content=response.content), logprobs=response.logprobs)
            yield chunk(Delta(), response.finish_reason)
            if include_usage:
                usage = msgspec.structs.replace(template, choices=[], usage=_usage(event))
                yield ServerSentEventMessage(data=_json(usage))
        yield ServerSentEventMessage(data="[DONE]")
    except Exception as exc:  # after the 200 went out: the error is the stream's last event
        status, body, _ = _error_body(exc)
        stream_ended(request, status)
        if status == 500:
            log.error("stream of operation %r failed", chat.NAME, exc_info=exc)
        yield ServerSentEventMessage(data=_json(body))
    finally:
        await events.aclose()


def openai_router(service: OrchestrationService, engine: Engine) -> Router:
    """``/v1``'s routes, over the ``chat`` operation (which must be loaded)."""
    operation = service.get(chat.NAME)
    started = int(time.time())

    def served_model() -> Model:
        return Model(id=engine.model_name(chat.NAME), object="model", created=started, owned_by=OWNER)

    @post(
        "/chat/completions",
        status_code=200,
        summary="OpenAI-compatible chat completion (operation `chat`); Server-Sent Events with `stream: true`.",
        operation_id="openai_chat_completions",
        opt={"operation": chat.NAME, "body_type": ChatCompletionRequest},
        **operation_documented(
            *_errors(400, 403, 404, 413, 415, 429, 500, 502, 503, 504),
            body=ErrorBody,
            operation_class=ChatCompletionsOperation,
        ),
    )
    async def chat_completions(
        request: Request[Any, Any, Any], data: JSONBody[ChatCompletionRequest]
    ) -> Response[ChatCompletion]:
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        request.state.request_id = completion_id  # the audit trail's request id
        model = served_model().id
        if data.model != model:
            raise ModelNotFoundError(f"The model '{data.model[:64]}' does not exist; this server serves '{model}'.")
        caller: Principal = request.user
        body = _as_operation_request(data)
        created = int(time.time())
        if data.stream:
            opened = service.open_stream(operation, body, key_id=caller.key_id)
            rate_limit, events = await cancel_on_disconnect(request, opened)  # refusals: plain JSON errors
            include_usage = data.stream_options is not None and data.stream_options.include_usage
            template = ChatCompletionChunk(
                id=completion_id, object="chat.completion.chunk", created=created, model=model, choices=[]
            )
            chunks = _chunks(request, events, template, include_usage)
            headers = {**rate_limit.headers(), "X-Request-Id": completion_id}
            return event_stream(request, events, chunks, headers)  # type: ignore[return-value]
        outcome = await cancel_on_disconnect(request, service.run(operation, body, key_id=caller.key_id))
        request.state.output_tokens = outcome.output_tokens
        response: chat.ChatResponse = outcome.response
        completion = ChatCompletion(
            id=completion_id,
            object="chat.completion",
            created=created,
            model=model,
            choices=[
                Choice(
                    index=0,
                    message=AssistantMessage(role="assistant", content=response.content),
                    finish_reason=response.finish_reason,
                    logprobs=None if response.logprobs is None else ChoiceLogprobs(content=response.logprobs),
                )
            ],
            usage=_usage(outcome),
        )
        return Response(completion, headers={**outcome.rate_limit.headers(), "X-Request-Id": completion_id})

    @get(
        "/models",
        summary="The model behind `/v1/chat/completions`.",
        operation_id="openai_list_models",
        **documented(*_errors(403, 500), body=ErrorBody),
    )
    async def list_models() -> ModelList:
        return ModelList(object="list", data=[served_model()])

    @get(
        "/models/{model_id:str}",
        summary="One model by id.",
        operation_id="openai_retrieve_model",
        **documented(*_errors(403, (404, "`model_id` is not the one `GET /v1/models` lists."), 500), body=ErrorBody),
    )
    async def retrieve_model(model_id: FromPath[str]) -> Model:
        model = served_model()
        if model_id != model.id:
            raise ModelNotFoundError(f"The model '{model_id[:64]}' does not exist; this server serves '{model.id}'.")
        return model

    return Router(
        PREFIX,
        route_handlers=[chat_completions, list_models, retrieve_model],
        exception_handlers=EXCEPTION_HANDLERS,
        tags=["openai"],
    )
