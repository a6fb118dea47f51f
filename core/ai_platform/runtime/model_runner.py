"""Executes the model work of a decode step: forward passes over one model's decode batch, and sampling.

The :class:`~ai_platform.runtime.scheduler.Scheduler` decides which rows decode and which prompt
prefills; the runner feeds them to the model through the batch's KV caches (``kv_batch``: their
layout, and the graph call each layout needs) and picks each row's next token with that sequence's
own sampler. It keeps no sequence state: row ``i`` of the KV batch is the scheduler's row ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ai_platform.runtime.generation import Sampler
from ai_platform.runtime.kv_batch import DecodeBatch, Prefill


class ModelRunner:
    """Runs one model's forward passes on its :class:`~ai_platform.runtime.kv_batch.DecodeBatch`; model thread only."""

    def __init__(self, batch: DecodeBatch) -> None:
        self.batch = batch

    @property
    def bytes_per_position(self) -> int:
        """Memory one position of one row takes while decoding (what the scheduler's KV budget counts)."""
        return self.batch.bytes_per_position

    def start_prefill(self, prompt: Sequence[int]) -> Prefill:
        """The prefill of ``prompt``, alone, one chunk per :meth:`prefill_chunk` (nothing runs yet)."""
        return self.batch.prefill(prompt)

    def prefill_chunk(self, prefill: Prefill, sample: Sampler) -> int | None:
        """Run ``prefill``'s next chunk; None while chunks remain.

        After the last chunk the sequence's first new token is picked with ``sample``, then its KV
        cache joins the batch as the last row, and the token is returned.
        """
        try:
            next(prefill)
            return None  # more chunks to go
        except StopIteration as done:
            logits, past = done.value
        token = sample(logits)
        self.batch.join(past)
        return token

    def decode(self, tokens: Sequence[int], samplers: Sequence[Sampler]) -> list[int]:
        """One forward pass feeding ``tokens[i]`` to row ``i``; each row's next token, picked by ``samplers[i]``."""
        logits = self.batch.step(tokens)
        return [sample(logits[row]) for row, sample in enumerate(samplers)]

    def remove(self, row: int) -> None:
        """Drop ``row``'s KV cache; the last row takes its place."""
        self.batch.remove(row)
