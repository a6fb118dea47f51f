"""Test-only runtime code: what the runtime's tests (and a benchmark) check the served paths against.

* :func:`greedy_generate`: one sequence, decoded greedily through the plain KV cache, no batch: the
  reference every batched, streamed or isolated generation must reproduce token for token;
* :class:`RecordingDecoder`: a decoder that keeps the logits each greedy token was picked from;
* :func:`score_options`: option scoring run to the end at once;
* :func:`jobs_only_loop`: an engine loop whose scheduler never decodes (a model-less stand-in), for
  tests of the job queue alone.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from ai_platform.runtime.engine_loop import EngineLoop
from ai_platform.runtime.generation import (
    Generated,
    GenerationCancelled,
    option_log_likelihoods_steps,
    prefill,
    run_steps,
)
from ai_platform.runtime.kv_batch import Prefill
from ai_platform.runtime.model_runner import ModelRunner
from ai_platform.runtime.onnx_model import OnnxDecoder
from ai_platform.runtime.prefix_cache import PrefixCache
from ai_platform.runtime.scheduler import Scheduler, finish_reason


def greedy_generate(
    model: OnnxDecoder,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    eos_ids: Collection[int],
    should_stop: Callable[[], bool] = lambda: False,
) -> Generated:
    """Greedy decoding: prefill the prompt once, then one token per step through the KV cache.

    Stops at an eos token, after ``max_new_tokens`` tokens, or at the model's context size (the
    runtime's stop check, :func:`finish_reason`). Raises :class:`GenerationCancelled` once
    ``should_stop()`` is true.
    """
    length = len(prompt)
    budget = min(max_new_tokens, model.max_positions - length)
    tokens: list[int] = []
    if budget <= 0:
        return Generated(tokens, "length")
    logits, past = prefill(model, prompt, should_stop)
    while True:
        token = int(np.argmax(logits))
        if token not in eos_ids:
            tokens.append(token)
        reason = finish_reason(token, len(tokens), budget, eos_ids)
        if reason is not None:
            return Generated(tokens, reason)
        if should_stop():
            raise GenerationCancelled
        position = length + len(tokens) - 1
        step_logits, past = model.forward(
            np.asarray([[token]], dtype=np.int64),
            np.ones((1, position + 1), dtype=np.int64),
            np.asarray([[position]], dtype=np.int64),
            past,
            keep_logits=1,
        )
        logits = step_logits[0, -1]


class RecordingDecoder:
    """A decoder that keeps each pass's last-position logits: passed to :func:`greedy_generate`, the logits
    each token was picked from (``logits[i]`` predicts token ``i``), for references of log-probabilities."""

    def __init__(self, decoder: OnnxDecoder) -> None:
        self._decoder = decoder
        self.logits: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._decoder, name)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, past = self._decoder.forward(*args, **kwargs)
        self.logits.append(logits[0, -1].copy())
        return logits, past


def score_options(
    model: OnnxDecoder,
    prompt: Sequence[int],
    options: Sequence[Sequence[int]],
    *,
    should_stop: Callable[[], bool] = lambda: False,
    cache: PrefixCache | None = None,
) -> list[float]:
    """All of :func:`option_log_likelihoods_steps` at once, checking ``should_stop`` before each pass."""
    return run_steps(option_log_likelihoods_steps(model, prompt, options, cache=cache), should_stop)


class _NoModel:
    """A decode batch with no model behind it: a scheduler over it only ever runs jobs."""

    size = 0
    bytes_per_position = 0

    def prefill(self, prompt: Sequence[int]) -> Prefill:
        raise AssertionError("no model: this loop runs jobs only")

    def join(self, past: list[np.ndarray]) -> None:
        raise AssertionError("no model: this loop runs jobs only")

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        raise AssertionError("no model: this loop runs jobs only")

    def remove(self, row: int) -> None:
        raise AssertionError("no model: this loop runs jobs only")


def jobs_only_loop(name: str, max_queue: int) -> EngineLoop:
    """An engine loop for jobs alone (``run``), its scheduler over no model."""
    return EngineLoop(name, max_queue, Scheduler(ModelRunner(_NoModel()), max_batch=1))
