"""The ``translate`` operation: text from ``source_language`` to ``target_language``."""

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
    hookimpl,
)
from ai_platform.languages import language_name
from ai_platform.operations import examples_file

MAX_INPUT_CHARS = 4000
# Prompt tokens (text and instructions): about twice what MAX_INPUT_CHARS of English make, so
# only dense scripts and symbol runs (emoji: ~3 tokens each) meet it before the character limit.
MAX_INPUT_TOKENS = 2048
MAX_OUTPUT_TOKENS = 512


class TranslateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_INPUT_CHARS)]
    source_language: LanguageCode
    target_language: LanguageCode
    request_id: RequestId | None = None


class TranslateResponse(msgspec.Struct, kw_only=True):
    translated_text: str
    source_language: str
    target_language: str
    meta: ResponseMeta


def prompt(request: TranslateRequest) -> Generate:
    source = language_name(request.source_language)
    target = language_name(request.target_language)
    return Generate(
        messages=[
            Message(
                "system",
                "You are a professional translator. Reply with the translation only, without notes or explanations.",
            ),
            Message("user", f"Translate the following text from {source} to {target}.\n\n{request.text}"),
        ]
    )


def respond(request: TranslateRequest, result: Completion, meta: ResponseMeta) -> TranslateResponse:
    return TranslateResponse(
        translated_text=result.text,
        source_language=request.source_language,
        target_language=request.target_language,
        meta=meta,
    )


OPERATION = Operation(
    name="translate",
    summary="Translate text from source_language to target_language.",
    request_type=TranslateRequest,
    response_type=TranslateResponse,
    stream_deltas=True,  # respond returns the model's text as it is
    limits=Limits(
        max_input_chars=MAX_INPUT_CHARS, max_output_tokens=MAX_OUTPUT_TOKENS, max_input_tokens=MAX_INPUT_TOKENS
    ),
    prompt=prompt,
    respond=respond,
    # Labelled examples for `ai-platform eval` and `selftest` (examples.jsonl; its "heldout" lines are never
    # used to tune the prompt): read on first use, not at startup.
    examples=examples_file("ai_platform_translate"),
)


@hookimpl
def register_operations() -> list[Operation]:
    return [OPERATION]
