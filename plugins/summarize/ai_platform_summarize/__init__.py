"""The ``summarize`` operation: a summary of at most ``max_sentences`` sentences."""

from __future__ import annotations

from typing import Annotated

import msgspec

from ai_platform import (
    Completion,
    Generate,
    LanguageCode,
    Limits,
    Message,
    Operation,
    RequestId,
    ResponseMeta,
    examples_file,
    hookimpl,
    split_sentences,
)
from ai_platform.languages import language_name

MAX_INPUT_CHARS = 8000
# Prompt tokens (text and instructions): about twice what MAX_INPUT_CHARS of English make, so
# only dense scripts and symbol runs (emoji: ~3 tokens each) meet it before the character limit.
MAX_INPUT_TOKENS = 4096
MAX_OUTPUT_TOKENS = 512


class SummarizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_INPUT_CHARS)]
    max_sentences: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    language: LanguageCode = "en"
    request_id: RequestId | None = None


class SummarizeResponse(msgspec.Struct, kw_only=True):
    summary: str
    sentence_count: int
    meta: ResponseMeta


def prompt(request: SummarizeRequest) -> Generate:
    n = request.max_sentences
    return Generate(
        messages=[
            Message(
                "system",
                "You are a precise assistant that writes faithful, concise summaries. Reply with the summary only.",
            ),
            Message(
                "user",
                f"Summarize the following text in {language_name(request.language)}, "
                f"in at most {n} sentence{'s' if n > 1 else ''}.\n\nText:\n{request.text}",
            ),
        ]
    )


def respond(request: SummarizeRequest, result: Completion, meta: ResponseMeta) -> SummarizeResponse:
    # The model may overrun the requested length; the contract is "at most".
    sentences = split_sentences(result.text)[: request.max_sentences]
    return SummarizeResponse(summary=" ".join(sentences), sentence_count=len(sentences), meta=meta)


OPERATION = Operation(
    name="summarize",
    summary="Summarize text in at most max_sentences sentences.",
    request_type=SummarizeRequest,
    response_type=SummarizeResponse,
    limits=Limits(
        max_input_chars=MAX_INPUT_CHARS, max_output_tokens=MAX_OUTPUT_TOKENS, max_input_tokens=MAX_INPUT_TOKENS
    ),
    prompt=prompt,
    respond=respond,
    # Labelled examples for `ai-platform eval` and `selftest` (examples.jsonl; its "heldout" lines are never
    # used to tune the prompt): read on first use, not at startup.
    examples=examples_file("ai_platform_summarize"),
)


@hookimpl
def register_operations() -> list[Operation]:
    return [OPERATION]
