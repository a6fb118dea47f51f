"""Iteration-level scheduling of greedy generation: sequences join and leave between decode steps.

Every step feeds one token for each active sequence in a single forward pass. A
new sequence is prefilled on its own and joins at the next step; each sequence
leaves on its own eos token, token limit or cancellation without disturbing the
others (their rows keep their KV cache).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from ai_platform.runtime.generation import Generated, GenerationCancelled
from ai_platform.runtime.kv_batch import DecodeBatch

Finish = Callable[[Generated | None, BaseException | None], None]


@dataclass(eq=False)
class SequenceRequest:
    """One greedy generation: its prompt, limits, and how to report the outcome.

    ``finish`` is called exactly once, on the scheduler's thread, with the result
    or the error (``GenerationCancelled`` once ``cancelled`` is set).
    """

    prompt: Sequence[int]
    budget: int  # new tokens allowed (token limit and room left in the context)
    eos_ids: Collection[int]
    finish: Finish
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)


class ContinuousBatch:
    """The sequences of one model that are decoding; run only on the model's thread."""

    def __init__(self, batch: DecodeBatch, max_batch: int) -> None:
        self._batch = batch
        self.max_batch = max_batch
        self._rows: list[SequenceRequest] = []  # row i of the KV batch belongs to _rows[i]

    @property
    def active(self) -> int:
        """Sequences decoding now."""
        return len(self._rows)

    @property
    def has_room(self) -> bool:
        return len(self._rows) < self.max_batch

    def admit(self, request: SequenceRequest) -> None:
        """Prefill ``request`` and take its first token; it decodes with the others from the next step."""
        if request.budget <= 0:
            request.finish(Generated([], "length"), None)
            return
        try:
            logits = self._batch.admit(request.prompt, request.cancelled.is_set)
        except Exception as exc:  # GenerationCancelled included: only this sequence is affected
            request.finish(None, exc)
            return
        self._rows.append(request)
        self._take(len(self._rows) - 1, logits)

    def step(self) -> None:
        """One decode step for every active sequence; finished and cancelled ones leave."""
        for row in reversed(range(len(self._rows))):
            if self._rows[row].cancelled.is_set():
                self._leave(row, None, GenerationCancelled())
        if not self._rows:
            return
        try:
            logits = self._batch.step([request.tokens[-1] for request in self._rows])
        except Exception as exc:
            self.fail_all(exc)
            return
        # Backwards, so a leaving row is only ever replaced by one already handled.
        for row in reversed(range(len(self._rows))):
            self._take(row, logits[row])

    def fail_all(self, error: BaseException) -> None:
        """End every active sequence with ``error`` (a failed step or shutdown)."""
        for row in reversed(range(len(self._rows))):
            self._leave(row, None, error)

    def _take(self, row: int, logits: np.ndarray) -> None:
        request = self._rows[row]
        token = int(np.argmax(logits))
        if token in request.eos_ids:
            self._leave(row, Generated(request.tokens, "stop"), None)
            return
        request.tokens.append(token)
        if len(request.tokens) >= request.budget:
            self._leave(row, Generated(request.tokens, "length"), None)

    def _leave(self, row: int, result: Generated | None, error: BaseException | None) -> None:
        request = self._rows[row]
        self._batch.remove(row)
        last = self._rows.pop()
        if row < len(self._rows):
            self._rows[row] = last
        request.finish(result, error)
