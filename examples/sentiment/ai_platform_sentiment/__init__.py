"""The ``sentiment`` operation: how a text feels, as probabilities over a few labels.

A third-party plugin, packaged on its own: it uses only ``ai_platform``'s
public API. Its labels can be changed per deployment in the plugin
configuration file::

    [sentiment]
    labels = ["positive", "negative", "neutral", "mixed"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from ai_platform import Choice, Choose, Limits, Message, Operation, RequestId, ResponseMeta, hookimpl

PLUGIN_API_VERSION = 1
MAX_INPUT_CHARS = 2000
DEFAULT_LABELS = ("positive", "negative", "neutral")


class SentimentRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_INPUT_CHARS)]
    request_id: RequestId | None = None


class SentimentResponse(msgspec.Struct, kw_only=True):
    sentiment: str
    confidence: float
    scores: dict[str, float]
    meta: ResponseMeta


def build_operation(labels: tuple[str, ...] = DEFAULT_LABELS) -> Operation:  # type: ignore[type-arg]
    """The operation over ``labels`` (at least two, unique)."""
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"sentiment labels must be at least two unique strings, not {list(labels)}")

    def prompt(request: SentimentRequest) -> Choose:
        return Choose(
            messages=[
                Message("system", f"Classify the sentiment of the text. Answer with one of: {', '.join(labels)}."),
                Message("user", request.text),
            ],
            options=labels,
        )

    def respond(request: SentimentRequest, result: Choice, meta: ResponseMeta) -> SentimentResponse:
        return SentimentResponse(
            sentiment=result.best, confidence=result.scores[result.best], scores=result.scores, meta=meta
        )

    return Operation(
        name="sentiment",
        summary=f"Sentiment of a text: {', '.join(labels)}, with a probability for each.",
        request_type=SentimentRequest,
        response_type=SentimentResponse,
        limits=Limits(max_input_chars=MAX_INPUT_CHARS, max_output_tokens=16),
        prompt=prompt,
        respond=respond,
    )


@hookimpl
def register_operations(config: Mapping[str, Any]) -> list[Operation]:  # type: ignore[type-arg]
    return [build_operation(tuple(config.get("labels", DEFAULT_LABELS)))]
