"""Decides what one model does next; the engine loop (``engine_loop``) executes it.

The decisions, in the order of a turn of the engine loop:

* **Admission** (:meth:`Scheduler.start_waiting`): waiting work starts in arrival order. A sequence
  joins while the batch has a free row and room in its KV budget (:meth:`Scheduler.can_admit`); a job
  (option scoring) starts while fewer than ``MAX_RUNNING_JOBS`` run; the first that cannot start waits,
  and so does everything behind it.
* **Fair share** (:meth:`Scheduler.job_turn`): jobs run in slices of one forward pass, taking turns
  with each other, and jobs and the batch's steps share the model's time evenly, so a long classify
  neither holds decoding sequences for its whole prefill nor is held by them.
* **The step** (:meth:`Scheduler.step`): sequences join and leave between decode steps (iteration-level
  scheduling). Every step feeds one token for each decoding sequence in a single forward pass, then
  runs one prefill chunk (``PREFILL_CHUNK`` prompt tokens) of the oldest new sequence, which joins the
  decoding ones once its prompt is done: a long prompt delays the others by one chunk per step, not by
  its whole prefill. The :class:`~ai_platform.runtime.model_runner.ModelRunner` runs those passes and
  samples each row's token with the sequence's own sampler (greedy, or drawn with a generator of its
  own: rows never share random numbers).
* **Finishing** (:func:`finish_reason`): each sequence leaves on its eos token, a stop string, its
  token limit or cancellation, without disturbing the others (their rows keep their KV cache).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ai_platform.operations import FinishReason
from ai_platform.runtime.generation import Generated, GenerationCancelled, Sampler, greedy_token
from ai_platform.runtime.kv_batch import Prefill
from ai_platform.runtime.model_runner import ModelRunner

Finish = Callable[[Generated | None, BaseException | None], None]

# Jobs that take turns at once; each holds its prompt's KV cache until it finishes.
MAX_RUNNING_JOBS = 4


def finish_reason(
    token: int, produced: int, budget: int, eos_ids: Collection[int], *, stop_string: bool = False
) -> FinishReason | None:
    """Why a sequence ends with ``token``, or None while it goes on: the one stop check of every decoding loop.

    "stop" at an eos token (which is not kept) or when a stop string appeared; "length" once the
    ``produced`` tokens kept (``token`` included unless it is an eos token) reach ``budget``.
    """
    if token in eos_ids or stop_string:
        return "stop"
    if produced >= budget:
        return "length"
    return None


@dataclass(eq=False)
class SequenceRequest:
    """One generation: its prompt, limits, how it picks tokens and ends, and how to report the outcome.

    ``finish`` is called exactly once, on the model's thread, with the result
    or the error (``GenerationCancelled`` once ``cancelled`` is set).
    """

    prompt: Sequence[int]
    budget: int  # new tokens allowed (token limit and room left in the context)
    eos_ids: Collection[int]
    finish: Finish
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    on_token: Callable[[int], None] | None = None  # called with each new token, on the model's thread
    sample: Sampler = greedy_token  # the next token from this row's logits
    # Called with each new token after on_token; True ends the sequence as "stop" (a stop string appeared).
    ends: Callable[[int], bool] | None = None


class Job(Protocol):
    """Model work other than generation (option scoring), run a slice at a time by the engine loop."""

    cancelled: threading.Event

    def advance(self) -> bool:
        """Run the next slice; True once the job is done (its outcome handed over)."""
        ...

    def drop(self) -> None:
        """Abandon the job (its caller is gone): nothing is reported."""
        ...


class Scheduler:
    """Decides for one model which work starts, whose turn it is, and what each decode step does.

    ``waiting`` (arrived, not started) and ``jobs`` (started, taking turns) are shared with the
    event loop's threads: the engine loop guards them with its lock. The sequences (decoding rows
    and the prefill queue) are touched only on the model's thread.
    """

    def __init__(self, runner: ModelRunner, max_batch: int, max_kv_bytes: int | None = None) -> None:
        self._runner = runner
        self.max_batch = max_batch
        self.max_kv_bytes = max_kv_bytes
        self.waiting: deque[Job | SequenceRequest] = deque()
        self.jobs: deque[Job] = deque()
        self._rows: list[SequenceRequest] = []  # row i of the KV batch belongs to _rows[i]
        self._prefilling: deque[tuple[SequenceRequest, Prefill]] = deque()
        self._batch_turn_ends = 0.0  # the batch steps alone until then (its share of the model's time)

    @property
    def active(self) -> int:
        """Sequences prefilling or decoding now."""
        return len(self._rows) + len(self._prefilling)

    @property
    def queue_depth(self) -> int:
        """Work waiting or running: waiting requests, active sequences and started jobs."""
        return len(self.waiting) + self.active + len(self.jobs)

    def has_work(self) -> bool:
        """Whether anything waits or runs."""
        return bool(self.waiting) or bool(self.active) or bool(self.jobs)

    def withdraw(self, item: Job | SequenceRequest) -> None:
        """Forget ``item`` if it has not started (its caller is gone)."""
        if item in self.waiting:
            self.waiting.remove(item)

    # -- admission --------------------------------------------------------------------------

    def start_waiting(self) -> list[SequenceRequest]:
        """Start waiting work in arrival order while it can start; returns the sequences to :meth:`admit`.

        Jobs move to ``jobs`` while fewer than ``MAX_RUNNING_JOBS`` run; sequences are admitted while
        :meth:`can_admit` allows. The first that cannot start waits. (Under the engine loop's lock:
        the sequences are admitted after it is released.)
        """
        admitted: list[SequenceRequest] = []
        while self.waiting:
            head = self.waiting[0]
            if isinstance(head, SequenceRequest):
                if not self.can_admit(head, admitted):
                    break
                admitted.append(head)
            elif len(self.jobs) < MAX_RUNNING_JOBS:
                self.jobs.append(head)
            else:
                break
            self.waiting.popleft()
        return admitted

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
        return (len(sequences) + 1) * longest * self._runner.bytes_per_position <= self.max_kv_bytes

    def admit(self, request: SequenceRequest) -> None:
        """Queue ``request``'s prompt; the next steps prefill it, then it decodes with the others.

        A request cancelled meanwhile is dropped (nobody waits for it).
        """
        if request.cancelled.is_set():
            return
        if request.budget <= 0:
            request.finish(Generated([], "length"), None)
            return
        self._prefilling.append((request, self._runner.start_prefill(request.prompt)))

    # -- fair share -------------------------------------------------------------------------

    def job_turn(self) -> Job | None:
        """The job whose slice runs now, or None while the batch has its share of the model's time.

        Jobs take turns; after a job's slice (a prefill chunk can take a second), the batch
        steps for as long before the next slice (see :meth:`job_ran`).
        """
        if self.jobs and not (self.active and time.monotonic() < self._batch_turn_ends):
            return self.jobs[0]
        return None

    def job_ran(self, done: bool, started: float, ended: float) -> None:
        """The job :meth:`job_turn` chose ran a slice from ``started`` to ``ended``; it goes last unless ``done``.

        Under the engine loop's lock (``jobs`` changes).
        """
        self._batch_turn_ends = 2 * ended - started
        job = self.jobs.popleft()
        if not done:
            self.jobs.append(job)

    # -- the step ---------------------------------------------------------------------------

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
            tokens = self._runner.decode([request.tokens[-1] for request in self._rows], [r.sample for r in self._rows])
        except Exception as exc:
            for row in reversed(range(len(self._rows))):
                self._leave(row, None, exc)
            return
        # Backwards, so a leaving row is only ever replaced by one already handled.
        for row in reversed(range(len(self._rows))):
            self._take(row, tokens[row])

    def _prefill_chunk(self) -> None:
        request, prefill = self._prefilling[0]
        try:
            token = self._runner.prefill_chunk(prefill, request.sample)
        except Exception as exc:  # only this sequence is affected
            self._prefilling.popleft()
            request.finish(None, exc)
            return
        if token is None:
            return  # more chunks to go
        self._prefilling.popleft()
        self._rows.append(request)  # the runner joined it as the KV batch's last row
        self._take(len(self._rows) - 1, token)

    def fail_all(self, error: BaseException) -> None:
        """End every sequence with ``error`` (shutdown)."""
        for row in reversed(range(len(self._rows))):
            self._leave(row, None, error)
        while self._prefilling:
            self._prefilling.popleft()[0].finish(None, error)

    # -- finishing --------------------------------------------------------------------------

    def _take(self, row: int, token: int) -> None:
        request = self._rows[row]
        stop_string = False
        if token not in request.eos_ids:
            request.tokens.append(token)
            if request.on_token is not None:
                request.on_token(token)
            stop_string = request.ends is not None and request.ends(token)
        reason = finish_reason(token, len(request.tokens), request.budget, request.eos_ids, stop_string=stop_string)
        if reason is not None:
            self._leave(row, Generated(request.tokens, reason), None)

    def _leave(self, row: int, result: Generated | None, error: BaseException | None) -> None:
        request = self._rows[row]
        self._runner.remove(row)
        last = self._rows.pop()
        if row < len(self._rows):
            self._rows[row] = last
        request.finish(result, error)
