"""The ``sentiment`` operation: how a text feels, as probabilities over a few labels.

A third-party plugin, packaged on its own: it uses only ``ai_platform``'s
public API. Its labels can be changed per deployment in the plugin
configuration file::

    [sentiment]
    labels = ["positive", "negative", "neutral", "mixed"]

It ships labelled examples (``EXAMPLES``), so ``ai-platform eval`` scores it and
``ai-platform selftest`` checks it like the built-in operations; a deployment's
labels keep the examples whose expected label they still offer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from ai_platform import Choice, Choose, Limits, Message, Operation, RequestId, ResponseMeta, hookimpl
from ai_platform.operations import Example

PLUGIN_API_VERSION = 1
MAX_INPUT_CHARS = 2000
DEFAULT_LABELS = ("positive", "negative", "neutral")


def _example(name: str, text: str, sentiment: str, split: Literal["dev", "heldout"] = "dev") -> Example:
    return Example(id=name, request={"text": text}, expected={"sentiment": sentiment}, split=split)


# Written for this plugin. Every third one is held out: never read while tuning the prompt.
EXAMPLES = (
    _example(
        "review-1", "The battery lasts two full days and the screen is gorgeous. Best phone I have owned.", "positive"
    ),
    _example("review-2", "It broke after a week and customer service never answered my emails.", "negative"),
    _example("review-3", "The parcel was delivered on Tuesday, as scheduled.", "neutral", "heldout"),
    _example(
        "review-4", "Our guide was funny and knew everything about the old town. A wonderful afternoon!", "positive"
    ),
    _example("review-5", "The room smelled of smoke and the shower was cold every morning.", "negative"),
    _example("review-6", "The course has six modules and a final exam.", "neutral", "heldout"),
    _example("review-7", "Quick delivery, fair price, and the shoes fit perfectly.", "positive"),
    _example("review-8", "Terrible. The film was two hours of noise and nothing happened.", "negative"),
    _example(
        "review-9", "I absolutely recommend this bakery: the bread is still warm at seven.", "positive", "heldout"
    ),
    _example("review-10", "The store is open from nine to six, Monday to Saturday.", "neutral"),
    _example("review-11", "The update deleted all my notes and there is no way to get them back.", "negative"),
    _example("review-12", "The manual is available in English and in French.", "neutral", "heldout"),
)


class SentimentRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_INPUT_CHARS)]
    request_id: RequestId | None = None


class SentimentResponse(msgspec.Struct, kw_only=True):
    sentiment: str
    confidence: float
    scores: dict[str, float]
    meta: ResponseMeta


def build_operation(labels: tuple[str, ...] = DEFAULT_LABELS) -> Operation[SentimentRequest, SentimentResponse, Choice]:
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
        # Only the examples whose expected label this deployment offers (labels are configurable).
        examples=tuple(e for e in EXAMPLES if e.expected["sentiment"] in labels),
    )


@hookimpl
def register_operations(config: Mapping[str, Any]) -> list[Operation]:
    return [build_operation(tuple(config.get("labels", DEFAULT_LABELS)))]
