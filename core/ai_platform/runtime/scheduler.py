"""Iteration-level scheduling of generation: sequences join and leave between decode steps.

Every step feeds one token for each decoding sequence in a single forward pass,
then runs one prefill chunk (``PREFILL_CHUNK`` prompt tokens) of the oldest new
sequence, which joins the decoding ones once its prompt is done: a long prompt
delays the others by one chunk per step, not by its whole prefill. Each sequence
leaves on its own eos token, token limit or cancellation without disturbing the
others (their rows keep their KV cache). Each sequence picks its tokens with its own sampler
(greedy, or drawn with a generator of its own: rows never share random numbers).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from ai_platform.runtime.generation import Generated, GenerationCancelled, Sampler, greedy_token
from ai_platform.runtime.kv_batch import DecodeBatch, Prefill

Finish = Callable[[Generated | None, BaseException | None], None]


@dataclass(eq=False)
class SequenceRequest:
    """One generation: its prompt, limits, how it picks tokens and ends, and how to report the outcome.

    ``finish`` is called exactly once, on the scheduler's thread, with the result
    or the error (``GenerationCancelled`` once ``cancelled`` is set).
    """

    prompt: Sequence[int]
    budget: int  # new tokens allowed (token limit and room left in the context)
    eos_ids: Collection[int]
    finish: Finish
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    on_token: Callable[[int], None] | None = None  # called with each new token, on the scheduler's thread
    sample: Sampler = greedy_token  # the next token from this row's logits
    # Called with each new token after on_token; True ends the sequence as "stop" (a stop string appeared).
    ends: Callable[[int], bool] | None = None


class ContinuousBatch:
    """The sequences of one model that are prefilling or decoding; run only on the model's thread."""

    def __init__(self, batch: DecodeBatch, max_batch: int, max_kv_bytes: int | None = None) -> None:
        self._batch = batch
        self.max_batch = max_batch
        self.max_kv_bytes = max_kv_bytes
        self._rows: list[SequenceRequest] = []  # row i of the KV batch belongs to _rows[i]
        self._prefilling: deque[tuple[SequenceRequest, Prefill]] = deque()

    @property
    def active(self) -> int:
        """Sequences prefilling or decoding now."""
        return len(self._rows) + len(self._prefilling)

    def can_admit(self, request: SequenceRequest, pending: Sequence[SequenceRequest] = ()) -> bool:
        """Whether ``request`` may start after ``pending`` (admitted, not started yet).

        It needs a free row, and room in ``max_kv_bytes`` for the batch's KV cache once
        every sequence, ``request`` included, is as long as the longest may become (right
        padding makes every row that long). Alone, a sequence always starts: its length is
        bounded by the model's context.
        """
        sequences = [*self._rows, *(entry[0] for entry in self._prefilling), *pending]
        if not sequences:
            return True
        if len(sequences) >= self.max_batch:
            return False
        if self.max_kv_bytes is None:
            return True
        longest = max(len(r.prompt) + r.budget for r in [*sequences, request])
        return (len(sequences) + 1) * longest * self._batch.bytes_per_position <= self.max_kv_bytes

    def admit(self, request: SequenceRequest) -> None:
        """Queue ``request``'s prompt; the next steps prefill it, then it decodes with the others."""
        if request.budget <= 0:
            request.finish(Generated([], "length"), None)
            return
        self._prefilling.append((request, self._batch.prefill(request.prompt)))

    def step(self) -> None:
        """One decode step for every decoding sequence, then one prefill chunk; finished and cancelled ones leave."""
        for row in reversed(range(len(self._rows))):
            if self._rows[row].cancelled.is_set():
                self._leave(row, None, GenerationCancelled())
        for entry in [e for e in self._prefilling if e[0].cancelled.is_set()]:
            self._prefilling.remove(entry)
            entry[0].finish(None, GenerationCancelled())
        if self._rows:
            self._decode()
        if self._prefilling:
            self._prefill_chunk()

    def _decode(self) -> None:
        try:
            logits = self._batch.step([request.tokens[-1] for request in self._rows])
        except Exception as exc:
            for row in reversed(range(len(self._rows))):
                self._leave(row, None, exc)
            return
        # Backwards, so a leaving row is only ever replaced by one already handled.
        for row in reversed(range(len(self._rows))):
            self._take(row, logits[row])

    def _prefill_chunk(self) -> None:
        request, chunks = self._prefilling[0]
        try:
            next(chunks)
            return  # more chunks to go
        except StopIteration as done:
            logits, past = done.value
        except Exception as exc:  # only this sequence is affected
            self._prefilling.popleft()
            request.finish(None, exc)
            return
        self._prefilling.popleft()
        try:
            self._batch.join(past)
        except Exception as exc:
            request.finish(None, exc)
            return
        self._rows.append(request)
        self._take(len(self._rows) - 1, logits)

    def fail_all(self, error: BaseException) -> None:
        """End every sequence with ``error`` (shutdown)."""
        for row in reversed(range(len(self._rows))):
            self._leave(row, None, error)
        while self._prefilling:
            self._prefilling.popleft()[0].finish(None, error)

    def _take(self, row: int, logits: np.ndarray) -> None:
        request = self._rows[row]
        token = request.sample(logits)
        if token in request.eos_ids:
            self._leave(row, Generated(request.tokens, "stop"), None)
            return
        request.tokens.append(token)
        if request.on_token is not None:
            request.on_token(token)
        if request.ends is not None and request.ends(token):
            self._leave(row, Generated(request.tokens, "stop"), None)
        elif len(request.tokens) >= request.budget:
            self._leave(row, Generated(request.tokens, "length"), None)

    def _leave(self, row: int, result: Generated | None, error: BaseException | None) -> None:
        request = self._rows[row]
        self._batch.remove(row)
        last = self._rows.pop()
        if row < len(self._rows):
            self._rows[row] = last
        request.finish(result, error)
