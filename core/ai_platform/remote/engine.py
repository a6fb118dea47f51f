"""``RemoteEngine``: the engine contract over remote OpenAI-compatible engines' ``/v1/chat/completions``.

One HTTP client (connection pool) per engine and options (``RemoteTarget.pool_key``), never reading proxies or
``.netrc`` from the environment (``trust_env=False``: nothing in the environment may send traffic elsewhere);
a circuit breaker per engine; a background probe (``GET {base}/models``) that tells whether the engine is up,
so that a down engine never stops the server from starting and its requests are refused before admission.

Failures map to the platform's errors, each naming the engine (its base URL, never its key): unreachable 503,
dropped mid-answer 503, busy (429/503) 503, no progress for ``timeout`` 504, an error status or an answer that
is not OpenAI's format 502 (:class:`~ai_platform.errors.EngineError`), a 400 saying the context is too long
the 422 (:class:`~ai_platform.engine_contract.PromptTooLongError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from ai_platform.engine_contract import ModelStatus, PromptTooLongError
from ai_platform.errors import (
    ConfigurationError,
    EngineError,
    ModelUnavailableError,
    OverloadedError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from ai_platform.operations import (
    Choice,
    Choose,
    Completion,
    FinishReason,
    Generate,
    Message,
    TextDelta,
    TokenLogprob,
)
from ai_platform.remote.circuit import DEFAULT_COOL_DOWN_SECONDS, DEFAULT_FAILURES, CircuitBreaker
from ai_platform.remote.sse import data_events
from ai_platform.remote.target import RemoteTarget

log = logging.getLogger(__name__)

PROVIDER = "openai-compatible"
CONNECT_ATTEMPTS = 2  # a refused or timed-out connection is tried once more; nothing after a byte arrived
CONNECT_RETRY_DELAY = 0.25
MAX_CONNECTIONS = 64  # per engine: requests beyond wait for a connection (then 503 after `timeout`)
MAX_KEEPALIVE = 16
TOP_LOGPROBS = 20  # the most OpenAI's API allows
FLOOR = 1e-4  # the score of an option that no candidate token starts, before normalizing
TIE_BREAK_TOKENS = 16  # a greedy answer long enough to tell apart options that share their first token
CHOOSE_ANSWER_TOKENS = 32  # choose=generate: a label's length, with room for a little chatter
MAX_ERROR_BODY = 16 * 1024
MAX_ANSWER_BODY = 4 * 1024 * 1024
TOO_LONG = re.compile(r"context length|context window|context size|too long", re.IGNORECASE)
UNAVAILABLE_RETRY_AFTER = 5


class _Garbage(Exception):
    """The engine answered, but not in OpenAI's format (the reason is logged, a short one is sent)."""


class _Dropped(Exception):
    """The engine's stream ended before its answer did."""


@dataclass
class _Backend:
    """One engine and options: its client (connection pool), circuit breaker and last known state."""

    base_url: str
    client: httpx.AsyncClient
    breaker: CircuitBreaker
    timeout: float
    reachable: bool | None = None  # None: not probed yet
    error: str | None = None  # the last failure, for admins (/health)
    next_probe: float | None = None  # loop time of the probe's next attempt while down
    probe: asyncio.Task[None] | None = None
    warned_no_usage: bool = False
    operations: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"remote engine {self.base_url}"


def _client(target: RemoteTarget, api_keys: Mapping[str, str], max_connections: int) -> httpx.AsyncClient:
    assert target.timeout is not None  # resolved by the builder (REQUEST_TIMEOUT_SECONDS)
    verify: ssl.SSLContext | bool = True
    if target.ca_file is not None:
        try:
            verify = ssl.create_default_context(cafile=target.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"ca_file {target.ca_file!r} of {target.base_url}: {exc}") from None
    headers = {}
    if target.key_env is not None:
        headers["Authorization"] = f"Bearer {api_keys[target.key_env]}"
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=min(MAX_KEEPALIVE, max_connections)
    )
    # timeout: no byte (or no next chunk) for that long; connect: the TCP (and TLS) handshake.
    timeout = httpx.Timeout(target.timeout, connect=target.connect_timeout)
    return httpx.AsyncClient(headers=headers, verify=verify, limits=limits, timeout=timeout, trust_env=False)


class RemoteEngine:
    """The engine contract for operations served by remote OpenAI-compatible engines.

    ``targets`` maps each operation to its engine and model (timeouts resolved); ``api_keys`` maps each
    ``key_env`` they name to its value. ``failures`` consecutive failures open an engine's circuit for
    ``cool_down`` seconds; the background probe retries a down engine ``probe_delays`` apart (doubling from
    the first to the second).
    """

    def __init__(
        self,
        targets: Mapping[str, RemoteTarget],
        *,
        api_keys: Mapping[str, str] | None = None,
        failures: int = DEFAULT_FAILURES,
        cool_down: float = DEFAULT_COOL_DOWN_SECONDS,
        probe_delays: tuple[float, float] = (1.0, 30.0),
        connect_retry_delay: float = CONNECT_RETRY_DELAY,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        keys = dict(api_keys or {})
        self._targets = dict(targets)
        self._backends: dict[str, _Backend] = {}
        by_pool: dict[tuple[object, ...], _Backend] = {}
        for operation, target in self._targets.items():
            if target.timeout is None:
                raise ValueError(f"the target of operation {operation!r} has no timeout")
            if target.key_env is not None and target.key_env not in keys:
                raise ConfigurationError(f"the API key variable {target.key_env} is not set")
            backend = by_pool.get(target.pool_key)
            if backend is None:
                backend = _Backend(
                    base_url=target.base_url,
                    client=_client(target, keys, max_connections),
                    breaker=CircuitBreaker(failures, cool_down),
                    timeout=target.timeout,
                )
                by_pool[target.pool_key] = backend
            backend.operations.append(operation)
            self._backends[operation] = backend
        self._distinct = list(by_pool.values())
        self._probe_delays = probe_delays
        self._connect_retry_delay = connect_retry_delay
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every engine in the background: the server starts whether they are up or not."""
        for backend in self._distinct:
            self._ensure_probe(backend)

    async def close(self) -> None:
        """Stop the probes and close the connection pools."""
        self._closed = True
        for backend in self._distinct:
            if backend.probe is not None:
                backend.probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await backend.probe
            await backend.client.aclose()

    def _ensure_probe(self, backend: _Backend) -> None:
        if not self._closed and (backend.probe is None or backend.probe.done()):
            backend.probe = asyncio.get_running_loop().create_task(self._probe(backend))

    async def _probe(self, backend: _Backend) -> None:
        """``GET {base}/models`` until it answers 2xx, with back-off; then the engine is up."""
        delay, longest = self._probe_delays
        loop = asyncio.get_running_loop()
        while True:
            try:
                response = await backend.client.get(f"{backend.base_url}/models")
                await response.aclose()
                problem = None if response.is_success else f"GET /models answered HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"GET /models failed: {_describe(exc)}"
            if problem is None:
                if backend.reachable is not True:
                    log.info("%s is up (operations: %s)", backend.name, ", ".join(backend.operations))
                backend.reachable, backend.next_probe = True, None
                return
            backend.reachable, backend.error = False, problem
            backend.next_probe = loop.time() + delay
            log.warning("%s is down (%s); next try in %g s", backend.name, problem, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    # -- what the platform reads -------------------------------------------------------------------

    def status(self) -> list[ModelStatus]:
        """One entry per operation: loaded when its engine answered its probe and its circuit is closed."""
        return [
            ModelStatus(
                operation=operation,
                model=self._targets[operation].model,
                path=backend.base_url,
                loaded=backend.reachable is True and backend.breaker.closed,
                provider=PROVIDER,
                error=backend.error,
            )
            for operation, backend in self._backends.items()
        ]

    def model_name(self, operation: str) -> str:
        """The model id the engine is asked for (``KeyError`` if the operation has none here)."""
        return self._targets[operation].model

    def _backend(self, operation: str) -> _Backend:
        backend = self._backends.get(operation)
        if backend is None:
            raise ModelUnavailableError(f"No model is configured for operation '{operation}'.")
        return backend

    def _unavailable(self, operation: str, backend: _Backend) -> ModelUnavailableError:
        if backend.breaker.refuses():
            retry_after = backend.breaker.retry_after()
        elif backend.next_probe is not None:
            retry_after = max(1, math.ceil(backend.next_probe - asyncio.get_running_loop().time()))
        else:
            retry_after = UNAVAILABLE_RETRY_AFTER
        model = self._targets[operation].model
        return ModelUnavailableError(
            f"Model '{model}' for operation '{operation}' ({backend.name}) is not available; retry later.",
            retry_after=retry_after,
        )

    async def check(self, operation: str, call: Generate | Choose) -> None:
        """No token count (the engine's tokenizer is remote); 503 at once if its engine is down or its circuit open."""
        backend = self._backend(operation)
        if backend.reachable is False or backend.breaker.refuses():
            raise self._unavailable(operation, backend)
        return None

    # -- one exchange with the engine --------------------------------------------------------------

    @asynccontextmanager
    async def _exchange(self, operation: str, body: dict[str, Any]) -> AsyncIterator[httpx.Response]:
        """``POST {base}/chat/completions``: the 200 response, its head read; every failure mapped and counted
        by the engine's circuit breaker. Leaving the block closes the response (the engine sees its request
        cancelled if its answer was not read to the end)."""
        backend = self._backend(operation)
        if not backend.breaker.acquire():
            raise self._unavailable(operation, backend)
        healthy: bool | None = None  # None: no verdict (the caller left, or the pool was full)
        try:
            try:
                response = await self._send(backend, body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                healthy = False
                backend.reachable, backend.error = False, f"connection failed: {_describe(exc)}"
                log.warning("%s unreachable for operation %r: %s", backend.name, operation, _describe(exc))
                self._ensure_probe(backend)
                raise self._unavailable(operation, backend) from None
            try:
                if response.status_code != 200:
                    error, healthy = await self._refusal(operation, backend, response)
                    raise error
                yield response
                healthy = True
            finally:
                await response.aclose()
        except httpx.PoolTimeout:
            raise OverloadedError(f"All connections to {backend.name} are busy; retry later.") from None
        except httpx.TimeoutException:
            healthy = False
            backend.error = f"no answer for {backend.timeout:g} s"
            log.warning("%s sent nothing for %g s (operation %r)", backend.name, backend.timeout, operation)
            raise RequestTimeoutError(f"The {backend.name} sent nothing for {backend.timeout:g} seconds.") from None
        except (httpx.TransportError, _Dropped) as exc:
            healthy = False
            why = _describe(exc) if isinstance(exc, httpx.TransportError) else str(exc)
            backend.error = f"connection lost mid-answer: {why}"
            log.warning("%s lost the connection mid-answer (operation %r): %s", backend.name, operation, why)
            raise ServiceUnavailableError(
                f"The {backend.name} closed the connection before its answer was complete; retry later.",
                retry_after=UNAVAILABLE_RETRY_AFTER,
            ) from None
        except _Garbage as exc:
            healthy = False
            backend.error = f"answer not in OpenAI's format: {exc}"
            log.warning("%s sent an answer not in OpenAI's format (operation %r): %s", backend.name, operation, exc)
            raise EngineError(f"The {backend.name} sent an invalid answer ({str(exc)[:120]}).") from None
        finally:
            if healthy is True:
                backend.breaker.succeeded()
                backend.reachable = True
            elif healthy is False:
                backend.breaker.failed()
            else:
                backend.breaker.abandoned()

    async def _send(self, backend: _Backend, body: dict[str, Any]) -> httpx.Response:
        """The response's head; a connection that fails is tried again (before any byte of an answer only).

        Written here rather than as httpx's transport ``retries``: those retry at once, and a refused
        connection is refused again at once.
        """
        request = backend.client.build_request("POST", f"{backend.base_url}/chat/completions", json=body)
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                return await backend.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if attempt == CONNECT_ATTEMPTS:
                    raise
                await asyncio.sleep(self._connect_retry_delay)
        raise AssertionError("unreachable")

    async def _refusal(
        self, operation: str, backend: _Backend, response: httpx.Response
    ) -> tuple[Exception, bool | None]:
        """The error for an engine's non-200 answer, and whether it says the engine is healthy."""
        raw = await _read(response, MAX_ERROR_BODY)
        message = _error_message(raw)
        status = response.status_code
        log.warning("%s answered HTTP %d for operation %r: %s", backend.name, status, operation, message[:500])
        if status in (400, 413, 422) and TOO_LONG.search(message):
            too_long = _too_long(message)
            if too_long is not None:
                return too_long, True
        if status in (429, 503):
            backend.error = f"busy: HTTP {status}"
            retry_after = _retry_after(response.headers.get("retry-after"))
            busy = ServiceUnavailableError(
                f"The {backend.name} is busy (HTTP {status}); retry later.", retry_after=retry_after
            )
            # An engine's 503 counts against its circuit; a 429 (its own limits) says nothing of its health.
            return busy, (False if status == 503 else None)
        if status >= 500:
            backend.error = f"HTTP {status}: {message[:200]}"
            return EngineError(f"The {backend.name} failed (HTTP {status})."), False
        short = _short(message)
        backend.error = f"HTTP {status}: {message[:200]}"
        return EngineError(
            f"The {backend.name} refused the request (HTTP {status}{': ' + short if short else ''})."
        ), True

    # -- generating --------------------------------------------------------------------------------

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion:
        """The engine's completion of ``call.messages`` (read from its stream)."""
        pieces = self.stream(operation, call, max_output_tokens=max_output_tokens)
        try:
            async for item in pieces:
                if isinstance(item, Completion):
                    return item
        finally:
            await pieces.aclose()
        raise AssertionError("stream ended without its Completion")

    async def stream(
        self, operation: str, call: Generate, *, max_output_tokens: int
    ) -> AsyncGenerator[str | Completion, None]:
        """The engine's text deltas as they arrive, then the :class:`Completion` (tokens from its ``usage``).

        Closing this before its end closes the HTTP response, which cancels the engine's request.
        """
        target = self._targets.get(operation)
        backend = self._backend(operation)
        assert target is not None
        body = _chat_body(target.model, call.messages, max_tokens=max_output_tokens, stream=True)
        body["stream_options"] = {"include_usage": True}
        body["temperature"] = call.temperature or 0.0
        if call.top_p is not None:
            body["top_p"] = call.top_p
        if call.seed is not None:
            body["seed"] = call.seed
        if call.stop:
            body["stop"] = list(call.stop)
        if call.logprobs is not None:  # OpenAI's own fields: passed through, read back per chunk
            body.update(logprobs=True, top_logprobs=call.logprobs)
        text: list[str] = []
        logprobs: list[TokenLogprob] = []
        usage: int | None = None
        finish: str | None = None
        done = False
        events = 0
        async with self._exchange(operation, body) as response:
            async for data in data_events(response.aiter_lines()):
                events += 1
                if done:
                    continue  # read to the end, so the connection can be kept
                if data.strip() == "[DONE]":
                    done = True
                    continue
                chunk = _object(data)
                if "error" in chunk:
                    raise _Garbage(f"an error event: {_short(_error_message(data.encode()))}")
                choices = chunk.get("choices")
                if not isinstance(choices, list):
                    raise _Garbage("a chunk without choices")
                if choices:
                    choice = choices[0]
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    if not isinstance(delta, dict | None):
                        raise _Garbage("a choice without a delta")
                    content = (delta or {}).get("content") or ""
                    if not isinstance(content, str):
                        raise _Garbage("a delta whose content is not text")
                    if content:
                        text.append(content)
                    if call.logprobs is not None:
                        pieces = _token_logprobs(choice)
                        logprobs.extend(pieces)
                        if pieces or content:
                            yield TextDelta(content, pieces)
                    elif content:
                        yield content
                    ended = choice.get("finish_reason")
                    if isinstance(ended, str) and ended:
                        finish = ended
                tokens = _completion_tokens(chunk)
                if tokens is not None:
                    usage = tokens
            if events == 0:
                raise _Garbage("no Server-Sent Events in the answer")
            if not done and finish is None:
                raise _Dropped("the stream ended without a finish_reason or [DONE]")
        if usage is None:
            usage = len(logprobs) or len(text)  # one entry per token where the engine sent logprobs
            self._warn_no_usage(backend)
        reason: FinishReason = "length" if finish == "length" else "stop"
        # None where the engine computes none (it ignored the request): not an empty list for a text.
        given = call.logprobs is not None and (bool(logprobs) or not text)
        yield Completion(
            text="".join(text),
            output_tokens=usage,
            finish_reason=reason,
            logprobs=logprobs if given else None,
        )

    def _warn_no_usage(self, backend: _Backend) -> None:
        if not backend.warned_no_usage:
            backend.warned_no_usage = True
            log.warning("%s reports no usage: output tokens are counted as its content chunks", backend.name)

    # -- choosing ----------------------------------------------------------------------------------

    async def choose(self, operation: str, call: Choose) -> Choice:
        """Probabilities of ``call.options`` as the engine's answer (README: "choose" per engine).

        ``logprobs``: the first answer token's top log-probabilities, each option scored by the candidates
        its text starts with; options tied on the same candidates are told apart by a short greedy answer.
        ``generate``: a short greedy answer matched to an option. ``call.neutral`` is not used (see README).
        """
        target = self._targets.get(operation)
        backend = self._backend(operation)
        assert target is not None
        options = list(dict.fromkeys(call.options))
        if not options:
            raise ValueError("Choose needs at least one option")
        if target.choose == "generate":
            answer, tokens = await self._answer(operation, target, call.messages, CHOOSE_ANSWER_TOKENS)
            matched = match_option(answer, options)
            if matched is None:
                log.warning(
                    "%s answered none of the options for operation %r: %r", backend.name, operation, answer[:200]
                )
                backend.error = "a choice answer that names no option"
                raise EngineError(f"The {backend.name} answered none of the options.")
            scores = {option: (1.0 if option == matched else FLOOR) for option in options}
            return Choice(scores=_normalized(scores), output_tokens=tokens)
        body = _chat_body(target.model, call.messages, max_tokens=1, stream=False)
        body.update(temperature=0.0, logprobs=True, top_logprobs=TOP_LOGPROBS)
        async with self._exchange(operation, body) as response:
            answer_json = _object((await _read(response, MAX_ANSWER_BODY)).decode("utf-8", "replace"))
            candidates = _top_logprobs(answer_json)
        counted = _completion_tokens(answer_json)
        if counted is None:
            self._warn_no_usage(backend)
        tokens = 1 if counted is None else counted
        scores, groups = score_options(candidates, options)
        top = max(scores.values())
        for group in groups:
            if len(group) < 2:
                continue
            share = scores[group[0]]
            if share == top and share > FLOOR:
                # Options sharing their first token: the greedy answer says which of them the model means.
                answer, more = await self._answer(operation, target, call.messages, TIE_BREAK_TOKENS)
                tokens += more
                matched = match_option(answer, group)
                if matched is not None:
                    scores.update({option: (share if option == matched else FLOOR) for option in group})
                    continue
            scores.update({option: share / len(group) for option in group})
        return Choice(scores=_normalized(scores), output_tokens=tokens)

    async def _answer(
        self, operation: str, target: RemoteTarget, messages: Sequence[Message], max_tokens: int
    ) -> tuple[str, int]:
        """A short greedy answer (not streamed) and its output tokens."""
        body = _chat_body(target.model, messages, max_tokens=max_tokens, stream=False)
        body["temperature"] = 0.0
        async with self._exchange(operation, body) as response:
            answer = _object((await _read(response, MAX_ANSWER_BODY)).decode("utf-8", "replace"))
            choices = answer.get("choices")
            message = (
                choices[0].get("message")
                if isinstance(choices, list) and choices and isinstance(choices[0], dict)
                else None
            )
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, str):
                raise _Garbage("an answer without choices[0].message.content")
        tokens = _completion_tokens(answer)
        if tokens is None:
            tokens = 1
            self._warn_no_usage(self._backend(operation))
        return content, tokens


# -- the wire format -------------------------------------------------------------------------------


def _chat_body(model: str, messages: Sequence[Message], *, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def _read(response: httpx.Response, most: int) -> bytes:
    """The body, at most ``most`` bytes of it (an engine's error page may be large)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= most:
            break
    return b"".join(chunks)[:most]


def _object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise _Garbage("not JSON") from None
    if not isinstance(value, dict):
        raise _Garbage("not a JSON object")
    return value


def _completion_tokens(answer: Mapping[str, Any]) -> int | None:
    usage = answer.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None


def _token_logprobs(choice: Mapping[str, Any]) -> list[TokenLogprob]:
    """A streamed choice's ``logprobs.content`` (OpenAI's format; ``bytes`` from the text where an engine sends none)."""

    def filled(entry: Mapping[str, Any]) -> dict[str, Any]:
        given = {key: value for key, value in entry.items() if value is not None}
        return {"bytes": list(str(entry.get("token", "")).encode()), **given}

    try:
        content = (choice.get("logprobs") or {}).get("content") or []
        return [
            msgspec.convert(
                {**filled(e), "top_logprobs": [filled(t) for t in e.get("top_logprobs") or []]}, TokenLogprob
            )
            for e in content
        ]
    except (msgspec.ValidationError, TypeError, AttributeError) as exc:
        raise _Garbage(f"logprobs not in OpenAI's format ({exc})") from None


def _top_logprobs(answer: Mapping[str, Any]) -> list[tuple[str, float]]:
    """``choices[0].logprobs.content[0]``'s candidates (its own token too) as (text, probability)."""
    try:
        first = answer["choices"][0]["logprobs"]["content"][0]
        entries = [first, *(first.get("top_logprobs") or [])]
        candidates: dict[str, float] = {}
        for entry in entries:
            token, logprob = entry["token"], float(entry["logprob"])
            if isinstance(token, str):
                candidates[token] = math.exp(logprob)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise _Garbage("no logprobs in the answer (an engine without them needs choose=generate)") from None
    return list(candidates.items())


def score_options(
    candidates: Sequence[tuple[str, float]], options: Sequence[str]
) -> tuple[dict[str, float], list[list[str]]]:
    """Each option's probability mass among the first-token ``candidates`` (text, probability) whose text,
    leading whitespace stripped and case ignored, starts the option (or is it); ``FLOOR`` for an option none
    starts. Also the groups of options scored by the same candidates (options that share their first
    token), which the caller tells apart or splits."""
    scores: dict[str, float] = {}
    by_tokens: dict[frozenset[str], list[str]] = {}
    for option in options:
        wanted = option.strip().lower()
        matched = frozenset(
            token for token, _ in candidates if (text := token.lstrip().lower()) and wanted.startswith(text)
        )
        scores[option] = sum(p for token, p in candidates if token in matched) if matched else FLOOR
        if matched:
            by_tokens.setdefault(matched, []).append(option)
    return scores, list(by_tokens.values())


def match_option(answer: str, options: Sequence[str]) -> str | None:
    """The option ``answer`` names: itself (quotes and a final period aside), else the longest option found
    in it ignoring case; ``None`` if none."""
    text = answer.strip().strip("\"'`*").rstrip(".").strip()
    if text in options:
        return text
    lowered = answer.lower()
    for option in sorted(options, key=len, reverse=True):
        if option.strip() and option.strip().lower() in lowered:
            return option
    return None


def _normalized(scores: Mapping[str, float]) -> dict[str, float]:
    total = sum(scores.values())
    return {option: score / total for option, score in scores.items()}


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message"}}``, ``{"error": "..."}``,
    ``{"detail": ...}``), else the text itself."""
    text = raw.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        if isinstance(body, dict):
            error = body.get("error", body.get("detail", body.get("message")))
            if isinstance(error, dict):
                error = error.get("message", error)
            if isinstance(error, str):
                return error
            return json.dumps(error)[:1000]
    return text


def _short(message: str) -> str:
    """A short, single-line reason fit for a client (engine internals such as tracebacks are cut)."""
    line = message.strip().splitlines()[0] if message.strip() else ""
    line = "".join(c for c in line if c.isprintable())
    return line[:120] + ("…" if len(line) > 120 else "")


# How engines say a prompt is too long, with its tokens and the most the context holds.
TOO_LONG_FORMS = (
    # vLLM and llama-cpp-python, in OpenAI's words: "This model's maximum context length is 4096 tokens. However,
    # you requested 5000 tokens (4500 in the messages, 500 in the completion)." The requested count includes the
    # answer's max_tokens: the prompt is the messages' part, and it may use the context less the completion's.
    re.compile(
        r"maximum context length is (?P<most>\d+) tokens.*?requested (?P<tokens>\d+) tokens"
        r"(?: \((?P<prompt>\d+) in the messages, (?P<completion>\d+) in the completion\))?",
        re.DOTALL,
    ),
    # llama.cpp's server: "request (5000 tokens) exceeds the available context size (4096 tokens), ..."
    re.compile(r"\((?P<tokens>\d+) tokens\) exceeds the available context size \((?P<most>\d+) tokens\)"),
    # another AI Platform: "Input is too long for the model's context window (5000 tokens; at most 4000)."
    re.compile(r"\((?P<tokens>\d+) tokens; at most (?P<most>\d+)\)"),
)


def _too_long(message: str) -> PromptTooLongError | None:
    """The 422 for an engine's "context too long" refusal, when its message gives both numbers."""
    for form in TOO_LONG_FORMS:
        found = form.search(message)
        if found is not None:
            parts = found.groupdict()
            if parts.get("prompt") is not None and parts.get("completion") is not None:
                return PromptTooLongError(int(parts["prompt"]), int(found["most"]) - int(parts["completion"]))
            return PromptTooLongError(int(found["tokens"]), int(found["most"]))
    return None


def _retry_after(value: str | None) -> int:
    try:
        seconds = int(value) if value is not None else UNAVAILABLE_RETRY_AFTER
    except ValueError:
        seconds = UNAVAILABLE_RETRY_AFTER
    return min(max(seconds, 1), 300)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
