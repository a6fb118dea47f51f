"""What an operation is: the spec a plugin returns from ``register_operations``.

An operation is pure data plus two functions: ``prompt`` turns a validated
request into a model call (:class:`Generate` or :class:`Choose`), and
``respond`` turns the model's result into the response struct. The core owns
everything else (HTTP, auth, limits, usage, timing, the ``meta`` block).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Literal

import msgspec
from typing_extensions import TypeVar

# Why a generation ended: "stop" (end of sequence, or a stop string) or "length" (token or context limit).
FinishReason = Literal["stop", "length"]

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

RequestId = Annotated[
    str,
    msgspec.Meta(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$", description="Client's id, echoed in meta."),
]
"""A client-chosen request id: 1-128 printable ASCII characters, echoed in ``meta.request_id``."""

LanguageCode = Annotated[
    str,
    msgspec.Meta(
        min_length=2, max_length=35, pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$", examples=["en", "ar", "fr"]
    ),
]
"""A BCP 47 language tag such as ``en``, ``ar`` or ``pt-BR``."""


class ResponseMeta(msgspec.Struct, kw_only=True):
    """The ``meta`` block every operation response carries (filled in by the core)."""

    operation: str
    model_used: str
    input_chars: int
    output_tokens: int
    execution_time_ms: float
    request_id: str | None
    timestamp: str


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Per-operation limits, enforced before any model work.

    ``daily_limit`` is the default number of requests per day; ``None`` means
    the ``DEFAULT_DAILY_LIMIT`` setting. Admins override it with ``PUT /limits``.
    ``max_input_tokens`` caps the prompt the operation builds, in the serving model's
    tokens, checked before admission (characters alone do not bound the work: 2,000 emoji
    are ~6,000 tokens); ``None`` leaves only the model's context window.
    ``max_output_tokens`` caps generation: every operation whose ``prompt`` may return
    :class:`Generate` needs it. A choosing operation, whose ``prompt`` is annotated to
    return :class:`Choose` only, generates nothing and may leave it ``None``.
    """

    max_input_chars: int
    max_output_tokens: int | None = None
    daily_limit: int | None = None
    max_input_tokens: int | None = None


@dataclass(frozen=True)
class Message:
    """One chat message; rendered with the model's own chat template."""

    role: str
    content: str


# The most ``Generate.logprobs`` may ask for: OpenAI's limit on ``top_logprobs``.
MAX_TOP_LOGPROBS = 20


class TopLogprob(msgspec.Struct, frozen=True, kw_only=True):
    """One of the most likely tokens at a place of the answer (OpenAI's ``top_logprobs`` entry)."""

    token: str  # the token's text alone; U+FFFD where it holds part of a character
    logprob: float  # natural log of its probability under the model (before temperature and top_p)
    bytes: list[int]  # its raw bytes (UTF-8, or part of a character)


class TokenLogprob(msgspec.Struct, frozen=True, kw_only=True):
    """A generated token's log-probability, with the most likely tokens at its place (OpenAI's format)."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]  # most likely first; as many as ``Generate.logprobs`` asked


class TextDelta(str):
    """A streamed piece of text that carries the log-probabilities of the tokens it came from.

    Streams (``Engine.stream``) yield ``str`` deltas; with ``Generate.logprobs`` they are
    :class:`TextDelta` s, whose ``logprobs`` are the tokens whose text begins in this piece
    (a token whose bytes are part of a character waits for the piece that completes it, so a
    piece may be ``""`` with tokens). Joined, the pieces' ``logprobs`` are the
    :class:`Completion`'s.
    """

    logprobs: tuple[TokenLogprob, ...]

    def __new__(cls, text: str, logprobs: Sequence[TokenLogprob]) -> TextDelta:
        delta = super().__new__(cls, text)
        delta.logprobs = tuple(logprobs)
        return delta

    def __reduce__(self) -> tuple[Any, ...]:  # pickled across the model process's pipe
        return (TextDelta, (str(self), self.logprobs))


@dataclass(frozen=True, kw_only=True)
class Generate:
    """Model call: generation from a chat prompt, greedy unless ``temperature`` is above 0.

    ``max_output_tokens`` may lower the operation's limit for this request,
    never raise it. With ``temperature`` > 0 each token is drawn from
    softmax(logits / temperature), within the ``top_p`` nucleus (the most likely
    tokens holding that much probability), by a random generator seeded with
    ``seed`` (``None``: unseeded). The text ends before the first ``stop`` string
    that appears in it (``finish_reason`` "stop"). ``logprobs`` (``None``: not computed,
    at no cost) asks for each generated token's log-probability under the model (of the raw
    logits, before temperature and top_p), with the ``logprobs`` most likely tokens at its
    place (0 to :data:`MAX_TOP_LOGPROBS`), in :attr:`Completion.logprobs`.
    """

    messages: Sequence[Message]
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"Generate.temperature must be a finite number >= 0, not {self.temperature!r}")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"Generate.top_p must be between 0 and 1, not {self.top_p!r}")
        if isinstance(self.stop, str) or not all(isinstance(stop, str) and stop for stop in self.stop):
            raise ValueError("Generate.stop must be a sequence of non-empty strings")
        if self.logprobs is not None and not (
            isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise ValueError(f"Generate.logprobs must be None or 0 to {MAX_TOP_LOGPROBS}, not {self.logprobs!r}")


@dataclass(frozen=True, kw_only=True)
class Choose:
    """Model call: score each option by the model's likelihood of answering exactly it.

    ``neutral``: the same messages with the input replaced by a content-free text such as
    ``"N/A"``. When given, an option's score is its log-likelihood for ``messages`` minus that
    for ``neutral`` (contextual calibration, Zhao et al. 2021): the model's preference for some
    labels whatever the text (their wording, their length, their place in the list) cancels
    out, and what is left is what the text itself says. It costs a second scoring of the options,
    paid once per distinct ``neutral`` prompt and options while the model keeps it in memory.
    """

    messages: Sequence[Message]
    options: Sequence[str]
    neutral: Sequence[Message] = ()


@dataclass(frozen=True, kw_only=True)
class Completion:
    """Result of :class:`Generate`.

    ``logprobs``: with ``Generate.logprobs``, one entry per generated token in order (the eos
    token not included), ``None`` otherwise or from an engine that does not compute them. With
    a ``stop`` string, the tokens whose text begins at or after the stop string are left out:
    the last token kept may hold the stop string's beginning. The tokens' ``bytes`` joined are
    the text generated (before ``text``'s surrounding whitespace is stripped).
    """

    text: str
    output_tokens: int
    finish_reason: FinishReason
    logprobs: Sequence[TokenLogprob] | None = None


@dataclass(frozen=True, kw_only=True)
class Choice:
    """Result of :class:`Choose`: probabilities over the options, summing to 1."""

    scores: dict[str, float]
    output_tokens: int

    @property
    def best(self) -> str:
        return max(self.scores, key=self.scores.__getitem__)


ModelCall = Generate | Choose
ModelResult = Completion | Choice

# The type parameters of :class:`Operation`: its request and response structs, and the model
# result its ``respond`` takes (:class:`Completion` for a ``Generate`` prompt, :class:`Choice`
# for a ``Choose`` one). All three are inferred from the arguments, so that
# ``Operation(request_type=SummarizeRequest, ..., respond=respond)`` is an
# ``Operation[SummarizeRequest, SummarizeResponse, Completion]``. They default to ``Any``: a bare
# ``Operation`` (``list[Operation]``, ``dict[str, Operation]``) is an operation of any types. A
# default of ``msgspec.Struct`` could not hold them: ``prompt`` takes a ``Req``, so an
# ``Operation[SummarizeRequest, ...]`` is not an ``Operation[msgspec.Struct, ...]``.
Req = TypeVar("Req", bound=msgspec.Struct, default=Any)
Resp = TypeVar("Resp", bound=msgspec.Struct, default=Any)
Result = TypeVar("Result", bound=ModelResult, default=Any)


SPLITS = ("dev", "heldout")


@dataclass(frozen=True, kw_only=True)
class Example:
    """A labelled example of an operation, for ``ai-platform eval`` and ``ai-platform selftest``.

    ``request`` is a request body (it must validate against the operation's ``request_type``).
    ``expected`` holds response fields that a correct answer has, compared with the response's
    fields of the same names: ``{"label": "billing"}`` (scored as classification for a
    :class:`Choose` operation), ``{"translated_text": "..."}`` (a reference text for a
    :class:`Generate` one). ``split``: ``"dev"`` examples may be read while writing prompts;
    ``"heldout"`` ones never are, so that their scores say how the prompt does on unseen text.
    ``id`` names the example in reports (default: its position).
    """

    request: Mapping[str, Any]
    expected: Mapping[str, Any] = field(default_factory=dict)
    split: Literal["dev", "heldout"] = "dev"
    id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request, Mapping):
            raise ValueError(f"Example.request must be a mapping (a request body), not {type(self.request).__name__}")
        if not isinstance(self.expected, Mapping):
            raise ValueError(
                f"Example.expected must be a mapping of response fields, not {type(self.expected).__name__}"
            )
        if self.split not in SPLITS:
            raise ValueError(f"Example.split must be one of {', '.join(SPLITS)}, not {self.split!r}")


def examples_file(package: str, resource: str = "examples.jsonl") -> Callable[[], tuple[Example, ...]]:
    """Examples shipped as a JSON Lines file in ``package``, read on first use, never at startup.

    Each line is an object with the fields of :class:`Example` (``request``, ``expected``,
    ``split``, ``id``); blank lines are skipped. List the file in the package's data
    (``[tool.setuptools.package-data]``) so that wheels carry it. Pass the result as
    ``Operation(examples=...)``.
    """

    @functools.cache
    def load() -> tuple[Example, ...]:
        text = importlib.resources.files(package).joinpath(resource).read_text(encoding="utf-8")
        examples = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                examples.append(Example(**json.loads(line)))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{package}/{resource}, line {number}: {exc}") from exc
        return tuple(examples)

    return load


def _request_text(request: Any) -> str:
    return str(request.text)


def _only_chooses(prompt: object) -> bool:
    """Whether ``prompt`` is annotated to return :class:`Choose` and nothing else (a choosing operation)."""
    try:
        returns = typing.get_type_hints(prompt).get("return")
    except Exception:  # not a function, or annotations that do not resolve: read as generating
        return False
    return isinstance(returns, type) and issubclass(returns, Choose)


@dataclass(frozen=True, kw_only=True)
class Operation(Generic[Req, Resp, Result]):
    """A task served at ``POST /operations/{name}``.

    ``request_type``/``response_type`` are ``msgspec.Struct`` classes: they are
    the validation and the OpenAPI schema at once. ``response_type`` must have
    a ``meta: ResponseMeta`` field. ``respond`` receives the result of the call
    ``prompt`` built: a :class:`Completion` or a :class:`Choice`. ``input_text``
    picks the text whose length counts as ``input_chars`` (default: the
    request's ``text`` field).
    ``examples`` are labelled :class:`Example` s for ``ai-platform eval`` and
    ``selftest``: a sequence, or a function returning one (called on first use, e.g.
    :func:`examples_file`), so that startup never reads them.
    """

    name: str
    summary: str
    request_type: type[Req]
    response_type: type[Resp]
    limits: Limits
    prompt: Callable[[Req], ModelCall]
    respond: Callable[[Req, Result, ResponseMeta], Resp]
    input_text: Callable[[Req], str] = field(default=_request_text)
    # True when ``respond`` keeps the model's text as it is (only stripped): a streaming
    # client then gets the text as it is decoded. Otherwise (``summarize`` cuts sentences)
    # a stream carries only the final event, so it never shows text the answer does not have.
    stream_deltas: bool = False
    examples: Sequence[Example] | Callable[[], Sequence[Example]] = ()

    def load_examples(self) -> tuple[Example, ...]:
        """The operation's examples (calling ``examples`` if it is a function); ``ValueError`` if malformed."""
        examples = self.examples() if callable(self.examples) else self.examples
        if isinstance(examples, str | bytes | Mapping) or not isinstance(examples, Sequence):
            raise ValueError(f"operation {self.name!r}: examples must be a sequence of Example")
        for example in examples:
            if not isinstance(example, Example):
                raise ValueError(f"operation {self.name!r}: examples must be Example, not {type(example).__name__}")
        return tuple(examples)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first problem with this spec."""
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f"operation name {self.name!r} must match {NAME_PATTERN.pattern}")
        for label, kind in (("request_type", self.request_type), ("response_type", self.response_type)):
            if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
                raise ValueError(f"operation {self.name!r}: {label} must be a msgspec.Struct subclass")
        fields = {f.name: f for f in msgspec.structs.fields(self.response_type)}
        if "meta" not in fields or fields["meta"].type is not ResponseMeta:
            raise ValueError(f"operation {self.name!r}: response_type needs a field 'meta: ResponseMeta'")
        for label in ("max_input_chars", "max_output_tokens", "daily_limit"):
            value = getattr(self.limits, label)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"operation {self.name!r}: limit {label} must be a positive integer")
        for label in ("prompt", "respond", "input_text"):
            if not callable(getattr(self, label)):
                raise ValueError(f"operation {self.name!r}: {label} must be callable")
        if self.limits.max_output_tokens is None and not _only_chooses(self.prompt):
            raise ValueError(
                f"operation {self.name!r}: limit max_output_tokens is required unless prompt is annotated "
                "to return Choose (an operation that may generate needs a cap)"
            )
        if not callable(self.examples):  # a function is called on first use only: never at startup
            self.load_examples()
        request_fields = {f.name for f in msgspec.structs.fields(self.request_type)}
        if "stream" in request_fields | {f.encode_name for f in msgspec.structs.fields(self.request_type)}:
            raise ValueError(f"operation {self.name!r}: request_type may not have a field 'stream' (the platform's)")
        if self.input_text is _request_text and "text" not in request_fields:
            raise ValueError(f"operation {self.name!r}: request_type has no 'text' field; pass input_text=")
