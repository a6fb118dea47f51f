"""Executes one model's work on a dedicated thread, fed by a bounded queue from the event loop.

The loop is the model's engine: each turn it asks its :class:`~ai_platform.runtime.scheduler.Scheduler`
what may start and whose turn it is, then executes that: a slice of a job (option scoring, one
forward pass), and a decode step of the continuous batch (``Scheduler.step``, whose forward passes
and sampling the ``ModelRunner`` runs). Work whose caller was cancelled before it started is
dropped; a running job stops before its next slice and a decoding sequence leaves the batch at the
next step, freeing its row for the next request. When the work runs out, the heap's free pages go
back to the system.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable, Collection, Generator, Sequence
from typing import Any, Generic, TypeVar

from ai_platform.errors import ModelUnavailableError, OverloadedError
from ai_platform.runtime.generation import Generated, Sampler, Steps, greedy_token
from ai_platform.runtime.scheduler import Job, Scheduler, SequenceRequest

T = TypeVar("T")

Work = Callable[[Callable[[], bool]], T]  # run in one slice; receives should_stop()


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        return None
    return trim


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``).

    A long prompt's KV buffers and activations are freed when its batch empties, but glibc
    keeps the pages: after a few long inputs a demo-model process stayed at 620 MB idle
    instead of ~260 MB. Called when a model's work runs out, so the cost (milliseconds)
    is paid only on the way to idle.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled by the caller or failed by close()
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _reporter(future: asyncio.Future[Any]) -> Callable[[Any, BaseException | None], None]:
    """A callback for the model's thread that hands an outcome to ``future``'s event loop."""
    loop = future.get_loop()

    def report(result: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, future, result, error)

    return report


class _Job(Generic[T]):
    """A job for the model's thread: :data:`Steps` run a slice at a time, or a :data:`Work` run in one."""

    def __init__(self, work: Work[T] | Steps[T], future: asyncio.Future[T]) -> None:
        self.future = future
        self.cancelled = threading.Event()
        self._steps: Steps[T] = work if isinstance(work, Generator) else self._at_once(work)

    def _at_once(self, work: Work[T]) -> Steps[T]:
        return work(self.cancelled.is_set)
        yield  # unreachable: makes this a generator whose first slice is all of ``work``

    def advance(self) -> bool:
        """Run the next slice on the model's thread; once the job is done, hand its outcome over and say so."""
        result: Any = None
        error: BaseException | None = None
        try:
            next(self._steps)
            return False
        except StopIteration as done:
            result = done.value
        except Exception as exc:
            error = exc
        _reporter(self.future)(result, error)
        return True

    def drop(self) -> None:
        """Abandon the job (its caller is gone): nothing is reported."""
        self._steps.close()


class EngineLoop:
    """Executes one model's work on its own thread, as its ``scheduler`` decides; at most ``max_queue`` requests wait."""

    def __init__(self, name: str, max_queue: int, scheduler: Scheduler) -> None:
        self.name = name
        self._max_queue = max_queue
        self._scheduler = scheduler
        self._closed = False
        # Guards the scheduler's queues (``waiting``, ``jobs``) and ``_closed``; wakes the idle thread.
        self._wakeup = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"model-{name}", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting or running on this model."""
        return self._scheduler.queue_depth

    def _enqueue(self, item: _Job[Any] | SequenceRequest) -> None:
        waiting = self._scheduler.waiting
        with self._wakeup:
            if self._closed:
                raise ModelUnavailableError(f"Model '{self.name}' is shutting down.")
            if len(waiting) >= self._max_queue:
                raise OverloadedError(f"Model '{self.name}' is busy: {len(waiting)} requests are already waiting.")
            waiting.append(item)
            self._wakeup.notify()

    async def _wait(self, item: _Job[Any] | SequenceRequest, future: asyncio.Future[T]) -> T:
        try:
            return await future
        except asyncio.CancelledError:
            item.cancelled.set()
            with self._wakeup:
                self._scheduler.withdraw(item)
            raise

    async def run(self, work: Work[T] | Steps[T]) -> T:
        """Queue a job and wait for its result; cancelling the wait cancels the job.

        ``Steps`` run one slice per turn of the model's loop, between other work; a plain
        ``Work`` callable runs in one turn and may poll its ``should_stop`` argument.
        """
        job: _Job[T] = _Job(work, asyncio.get_running_loop().create_future())
        self._enqueue(job)
        return await self._wait(job, job.future)

    async def generate(
        self,
        prompt: Sequence[int],
        budget: int,
        eos_ids: Collection[int],
        on_token: Callable[[int], None] | None = None,
        *,
        sample: Sampler = greedy_token,
        ends: Callable[[int], bool] | None = None,
    ) -> Generated:
        """Decode ``prompt`` in the model's continuous batch (at most ``budget`` new tokens).

        ``on_token`` is called with each new token, on the caller's event loop, before the
        result. ``sample`` picks each token from the logits; ``ends``, called on the model's
        thread with each token, ends the generation as "stop" when it returns True.
        Cancelling the wait removes the sequence from the batch at the next step.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Generated] = loop.create_future()
        request = SequenceRequest(prompt, budget, eos_ids, _reporter(future), sample=sample, ends=ends)
        if on_token is not None:
            report_token = on_token

            def hand_over(token: int) -> None:
                with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting
                    loop.call_soon_threadsafe(report_token, token)

            request.on_token = hand_over
        self._enqueue(request)
        return await self._wait(request, future)

    def _loop(self) -> None:
        scheduler = self._scheduler

        def idle() -> bool:
            return not scheduler.has_work() and not self._closed

        worked = False  # since memory was last given back
        while True:
            with self._wakeup:
                going_idle = worked and idle()
            if going_idle:
                release_free_memory()
                worked = False
            with self._wakeup:
                while idle():
                    self._wakeup.wait()
                worked = True
                if self._closed:
                    break
                # In arrival order, while rows, KV memory and job slots allow (the scheduler decides).
                admitted = scheduler.start_waiting()
            for request in admitted:
                scheduler.admit(request)
            # Jobs and the batch share the model's time evenly: a job's slice, then the batch steps for as long.
            job = scheduler.job_turn()
            if job is not None:
                started = time.monotonic()
                if job.cancelled.is_set():
                    job.drop()
                    done = True
                else:
                    done = job.advance()
                ended = time.monotonic()
                with self._wakeup:
                    scheduler.job_ran(done, started, ended)
            if scheduler.active:
                scheduler.step()
        for job in scheduler.jobs:
            job.drop()
        scheduler.fail_all(ModelUnavailableError(f"Model '{self.name}' is shutting down."))

    async def close(self) -> None:
        """Fail waiting work, stop running work at its next step and wait for the thread."""
        with self._wakeup:
            self._closed = True
            items: list[Job | SequenceRequest] = [*self._scheduler.waiting, *self._scheduler.jobs]
            self._scheduler.waiting.clear()
            self._wakeup.notify()
        for item in items:
            item.cancelled.set()
            if isinstance(item, SequenceRequest):
                item.finish(None, ModelUnavailableError(f"Model '{self.name}' is shutting down."))
            elif isinstance(item, _Job):
                _settle(item.future, None, ModelUnavailableError(f"Model '{self.name}' is shutting down."))
        await asyncio.to_thread(self._thread.join)
