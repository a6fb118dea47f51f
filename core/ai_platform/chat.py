"""The ``chat`` operation: a conversation in, the model's next message out, sampled as the caller asks.

It serves ``POST /v1/chat/completions`` (``api/openai_compat.py``, OpenAI's wire format) and
``POST /operations/chat`` (the platform's), so that both go through the same admission,
limits, quotas, usage and audit as every operation. The core registers it as the plugin
``chat`` only when ``OPENAI_API=true``; its limits come from its section of ``PLUGINS_CONFIG``
(``[chat]``: ``max_input_chars``, ``max_input_tokens``, ``max_output_tokens``).

Its request is OpenAI's chat request without ``model`` and ``stream`` (the route's own):
text messages only, one choice, no penalties; log probabilities (``logprobs``, ``top_logprobs``)
of the model's distribution; a field the server does not know is refused, so a client never
believes a setting took effect when it did not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from ai_platform.errors import RequestValidationError
from ai_platform.hookspecs import hookimpl
from ai_platform.operations import (
    MAX_TOP_LOGPROBS,
    Completion,
    FinishReason,
    Generate,
    Limits,
    Message,
    Operation,
    ResponseMeta,
    TokenLogprob,
)

NAME = "chat"
PLUGIN_NAME = "chat"

DEFAULT_LIMITS = {"max_input_chars": 32_000, "max_input_tokens": None, "max_output_tokens": 1024}
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: a client that sends none gets what OpenAI would give it
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4


class TextPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A text part of a message's content (the only kind this server reads)."""

    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One message of the conversation; ``developer`` is taken as ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: Annotated[str, msgspec.Meta(max_length=256)] | None = None  # accepted; chat templates have no use for it

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)


StopString = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
TopLogprobs = Annotated[
    int,
    msgspec.Meta(
        ge=0, le=MAX_TOP_LOGPROBS, description="The most likely tokens listed at each place (needs logprobs)."
    ),
]


class ChatRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2, description="0: greedy. Default 1.")] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    seed: int | None = None
    stop: StopString | Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1, description="Only 1.")] | None = None
    logprobs: Annotated[bool, msgspec.Meta(description="Each answer token's log-probability.")] | None = None
    top_logprobs: TopLogprobs | None = None
    presence_penalty: Annotated[float, msgspec.Meta(description="Not supported: only 0.")] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(description="Not supported: only 0.")] | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None  # accepted, not used


class ChatResponse(msgspec.Struct, kw_only=True):
    content: str
    finish_reason: FinishReason
    meta: ResponseMeta
    # With logprobs: true (null otherwise, or from an engine that does not compute them): see Completion.logprobs.
    logprobs: list[TokenLogprob] | None = None


def _unsupported(field: str, message: str) -> RequestValidationError:
    return RequestValidationError.one("value_error", message, loc=["body", field])


def input_text(request: ChatRequest) -> str:
    """The conversation's text: what ``max_input_chars`` limits and ``meta.input_chars`` counts."""
    return "\n".join(message.text for message in request.messages)


def build_operation(config: Mapping[str, Any]) -> Operation[ChatRequest, ChatResponse]:
    """The operation, with the limits of the plugin's configuration section."""
    unknown = sorted(set(config) - set(DEFAULT_LIMITS))
    if unknown:
        raise ValueError(f"unknown setting(s) in [chat]: {', '.join(unknown)}; known: {', '.join(DEFAULT_LIMITS)}")
    limits = Limits(**{**DEFAULT_LIMITS, **config})
    output_limit = limits.max_output_tokens
    if output_limit is None:  # a generating operation needs its cap (TOML has no null: only a caller passes None)
        raise ValueError("[chat] max_output_tokens must be a positive integer, not None")

    def prompt(request: ChatRequest) -> Generate:
        if request.top_logprobs is not None and not request.logprobs:
            raise _unsupported("top_logprobs", "top_logprobs needs logprobs: true")
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(request, field):
                raise _unsupported(field, f"{field} is not supported by this server; send 0 or leave it out")
        asked = [n for n in (request.max_tokens, request.max_completion_tokens) if n is not None]
        if asked and min(asked) > output_limit:
            field = "max_tokens" if request.max_tokens is not None else "max_completion_tokens"
            raise RequestValidationError.one(
                "less_than_equal",
                f"Input should be less than or equal to {output_limit} (this server's output limit)",
                loc=["body", field],
                input=min(asked),
            )
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or ())
        return Generate(
            messages=[Message("system" if m.role == "developer" else m.role, m.text) for m in request.messages],
            max_output_tokens=min(asked) if asked else None,
            temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=stop,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        )

    def respond(request: ChatRequest, result: Completion, meta: ResponseMeta) -> ChatResponse:
        logprobs = list(result.logprobs) if request.logprobs and result.logprobs is not None else None
        return ChatResponse(content=result.text, finish_reason=result.finish_reason, meta=meta, logprobs=logprobs)

    return Operation(
        name=NAME,
        summary="The model's next message in a conversation (also served OpenAI-style at /v1/chat/completions).",
        request_type=ChatRequest,
        response_type=ChatResponse,
        limits=limits,
        prompt=prompt,
        respond=respond,
        input_text=input_text,
        stream_deltas=True,  # respond returns the model's text as it is
    )


@hookimpl
def register_operations(config: Mapping[str, Any]) -> list[Operation]:
    return [build_operation(config)]
