"""What a generation is made of, over an :class:`OnnxDecoder` with a KV cache: token picking, prefill, option scoring.

How a generation picks tokens (greedy, or sampled: :class:`Sampling`), its result (:class:`Generated`), a
prompt's chunked prefill, and the log-likelihoods of a choice's options. Batching, and the one stop check,
are the scheduler's (``scheduler``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ai_platform.operations import MAX_TOP_LOGPROBS, FinishReason
from ai_platform.runtime.onnx_model import OnnxDecoder
from ai_platform.runtime.prefix_cache import PrefixCache

# Prompt tokens per prefill pass. Graphs exported without ``num_logits_to_keep``
# return full-vocabulary logits for every input position, so an unchunked long
# prompt would need prompt_len x vocab floats at once (gigabytes for a 150k
# vocabulary); chunks bound that and let a cancelled call stop between them.
PREFILL_CHUNK = 512

# Rows per batched forward pass when scoring options; bounds the memory of the
# repeated prompt KV cache (batch x layers x kv_heads x prompt_len x head_dim).
MAX_OPTION_BATCH = 16


class GenerationCancelled(Exception):
    """The caller no longer wants the result; raised between decoding steps."""


@dataclass(frozen=True)
class Generated:
    """New token ids (without the eos token) and why generation ended."""

    tokens: list[int]
    finish_reason: FinishReason


# Nucleus sampling sorts only the most likely tokens when they hold top_p of the mass (they
# nearly always do): a full sort of a 150k vocabulary would cost milliseconds a token.
NUCLEUS_CANDIDATES = 1024

Sampler = Callable[[np.ndarray], int]  # a row's logits in, the next token out


def greedy_token(logits: np.ndarray) -> int:
    """The most likely token (the first of equals)."""
    return int(np.argmax(logits))


def sample_token(logits: np.ndarray, *, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """A token drawn from softmax(logits / temperature), restricted to the top_p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches
    ``top_p`` (at least one token; ``top_p`` 1: all of them); the draw is renormalised
    over it. One ``rng.random()`` per call, by inverse CDF.
    """
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    candidates: np.ndarray | None = None
    if top_p < 1.0:
        size = probs.shape[-1]
        top = np.argpartition(-probs, NUCLEUS_CANDIDATES)[:NUCLEUS_CANDIDATES] if size > NUCLEUS_CANDIDATES else None
        if top is None or probs[top].sum() < top_p:
            top = np.arange(size)
        order = top[np.argsort(-probs[top], kind="stable")]
        cumulative = np.cumsum(probs[order])
        keep = min(int(np.searchsorted(cumulative, top_p)) + 1, len(order))
        candidates = order[:keep]
        probs = probs[candidates]
    cumulative = np.cumsum(probs)
    index = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(probs) - 1)
    return int(candidates[index]) if candidates is not None else index


LOGPROB_FLOOR = -9999.0  # what OpenAI's API reports for a token of no probability


@dataclass(frozen=True)
class PickedLogprobs:
    """A picked token's log-probability under the model, and the ``k`` most likely tokens at its place."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first


def picked_logprobs(logits: np.ndarray, token: int, k: int) -> PickedLogprobs:
    """log_softmax(``logits``) at ``token`` and at the ``k`` largest logits (the first of equals first).

    Of the raw logits (before temperature and top_p: OpenAI's and vLLM's convention). The full
    log-softmax is not built: one exp over the vocabulary in the logits' float32 (summed in
    float64; float64 exp costs 8 times as much) and a partial sort of k. About 0.3 ms a token
    for a 49k vocabulary on one core.
    """
    x = logits if logits.dtype in (np.float32, np.float64) else logits.astype(np.float32)
    peak = x.max()
    log_total = float(peak) + math.log(float(np.exp(x - peak).sum(dtype=np.float64)))
    top: tuple[tuple[int, float], ...] = ()
    size = x.shape[-1]
    if k > 0:
        k = min(k, size)
        best = np.argpartition(x, size - k)[size - k :] if k < size else np.arange(size)
        best = best[np.lexsort((best, -x[best]))]  # by logit, descending; equal logits by id
        top = tuple((int(i), _finite(float(x[i]) - log_total)) for i in best)
    return PickedLogprobs(token, _finite(float(x[token]) - log_total), top)


def _finite(logprob: float) -> float:
    """``logprob``, or OpenAI's floor of -9999 for an impossible token (a -inf or NaN logit), which JSON cannot hold."""
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


@dataclass(frozen=True)
class Sampling:
    """How a generation picks each token: greedy (``temperature`` 0, the default), or sampled.

    Sampled: from softmax(logits / ``temperature``), within the ``top_p`` nucleus, by a
    generator of the generation's own, seeded with ``seed`` (``None``: fresh entropy), so
    that rows of a batch draw independently and a seed repeats its text.

    ``logprobs`` (``None``: nothing is computed): the sampler also reports each picked token's
    :func:`picked_logprobs` with that many most likely tokens (0 to ``MAX_TOP_LOGPROBS``).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, not {self.temperature!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be between 0 and 1, not {self.top_p!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be None or 0 to {MAX_TOP_LOGPROBS}, not {self.logprobs!r}")

    def sampler(self, report: Callable[[PickedLogprobs], None] | None = None) -> Sampler:
        """A new sampler for one generation (its own generator: call once per generation).

        With ``logprobs`` set and a ``report``, each pick is reported (on the model's thread,
        before the token is returned); otherwise nothing beyond the pick is computed.
        """
        pick = greedy_token if self.temperature == 0 else self._sample()
        if self.logprobs is None or report is None:
            return pick
        k = self.logprobs

        def pick_and_report(logits: np.ndarray) -> int:
            token = pick(logits)
            report(picked_logprobs(logits, token, k))
            return token

        return pick_and_report

    def _sample(self) -> Sampler:
        # numpy seeds with non-negative integers: a negative seed is taken modulo 2**64.
        rng = np.random.default_rng(None if self.seed is None else self.seed % 2**64)
        temperature, top_p = self.temperature, self.top_p

        def sample(logits: np.ndarray) -> int:
            return sample_token(logits, temperature=temperature, top_p=top_p, rng=rng)

        return sample


GREEDY = Sampling()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    # float64: sums of many small log-probabilities must not lose precision.
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def _ones(length: int) -> np.ndarray:
    return np.ones((1, length), dtype=np.int64)


def prefill_chunks(
    model: OnnxDecoder, prompt: Sequence[int], cache: PrefixCache | None = None
) -> Generator[None, None, tuple[np.ndarray, list[np.ndarray]]]:
    """Prefill the prompt one chunk per iteration (pausing between chunks); returns (last logits, KV cache).

    With a ``cache``, the positions it holds for the prompt's start are reused and the
    prompt's own KV cache is kept there for later prompts.
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    done, past = cache.lookup(prompt) if cache is not None else (0, None)
    if past is None:
        past = model.empty_past(1)
    for start in range(done, len(prompt), PREFILL_CHUNK):
        if start > done:
            yield
        chunk = prompt[start : start + PREFILL_CHUNK]
        end = start + len(chunk)
        logits, past = model.forward(
            np.asarray([chunk], dtype=np.int64),
            _ones(end),
            np.arange(start, end, dtype=np.int64)[None],
            past,
            keep_logits=1,
        )
    if cache is not None:
        cache.store(prompt, past)
    last: np.ndarray = logits[0, -1]  # only the last position predicts a new token
    return last, past


T = TypeVar("T")

# Work in slices: each ``next()`` runs one forward pass (a prefill chunk, an options pass),
# so the model's engine loop can interleave it with other work; the value comes with StopIteration.
Steps = Generator[None, None, T]


def run_steps(steps: Steps[T], should_stop: Callable[[], bool]) -> T:
    """Run ``steps`` to the end at once, checking ``should_stop`` before each slice."""
    while True:
        if should_stop():
            steps.close()
            raise GenerationCancelled
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value  # type: ignore[no-any-return]


def prefill(
    model: OnnxDecoder,
    prompt: Sequence[int],
    should_stop: Callable[[], bool],
    cache: PrefixCache | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """All of :func:`prefill_chunks` at once, checking ``should_stop`` before each chunk."""
    return run_steps(prefill_chunks(model, prompt, cache), should_stop)


def option_log_likelihoods_steps(
    model: OnnxDecoder,
    prompt: Sequence[int],
    options: Sequence[Sequence[int]],
    *,
    cache: PrefixCache | None = None,
) -> Steps[list[float]]:
    """log P(option | prompt) for each option's token ids: the sum of :func:`option_log_probs_steps`."""
    per_token = yield from option_log_probs_steps(model, prompt, options, cache=cache)
    return [sum(log_probs) for log_probs in per_token]


def option_log_probs_steps(
    model: OnnxDecoder,
    prompt: Sequence[int],
    options: Sequence[Sequence[int]],
    *,
    cache: PrefixCache | None = None,
) -> Steps[list[list[float]]]:
    """log P(token | prompt, the option's tokens before it) for each token of each option.

    One forward pass per slice (see :data:`Steps`): the prompt's prefill chunks, then the
    options as right-padded batches that reuse its KV cache. The pads are fed as ordinary
    tokens (mask 1): under causal attention no real token attends to a pad after it, pads'
    own outputs are ignored, and fused attention, which reads each row's length from its
    mask, sees every row as the same length.
    """
    if not options or any(len(option) == 0 for option in options):
        raise ValueError("every option needs at least one token")
    length = len(prompt)
    last, past = yield from prefill_chunks(model, prompt, cache)
    first = _log_softmax(last)
    per_token = [[float(first[option[0]])] for option in options]
    # GroupQueryAttention takes several new tokens on top of a past only for one row at a time.
    rows_per_pass = 1 if model.fused_attention else MAX_OPTION_BATCH
    for start in range(0, len(options), rows_per_pass):
        chunk = options[start : start + rows_per_pass]
        # Feed every option token but the last; position j predicts token j + 1.
        width = max(len(option) for option in chunk) - 1
        if width == 0:
            continue
        yield
        rows = len(chunk)
        input_ids = np.zeros((rows, width), dtype=np.int64)
        for row, option in enumerate(chunk):
            input_ids[row, : len(option) - 1] = option[:-1]
        positions = np.broadcast_to(np.arange(length, length + width, dtype=np.int64), (rows, width))
        batch_past = [np.repeat(layer, rows, axis=0) for layer in past]
        logits, _ = model.forward(
            input_ids, _ones(length + width).repeat(rows, axis=0), np.ascontiguousarray(positions), batch_past
        )
        for row, option in enumerate(chunk):
            steps = len(option) - 1
            log_probs = _log_softmax(logits[row, :steps])
            per_token[start + row].extend(float(x) for x in log_probs[np.arange(steps), option[1:]])
    return per_token
