"""A dedicated thread per loaded model, with a bounded queue of work from the event loop.

Two kinds of work share the queue, in arrival order. Greedy generations join the
model's :class:`ContinuousBatch` and decode together, one step at a time; other
jobs (option scoring) run alone between two steps. Work whose caller was
cancelled before it started is dropped; a running job sees its ``should_stop``
callback turn true and a decoding sequence leaves the batch at the next step,
freeing its row for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import threading
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any, Generic, TypeVar

from ai_platform.errors import ModelUnavailableError, OverloadedError
from ai_platform.runtime.generation import Generated
from ai_platform.runtime.scheduler import ContinuousBatch, SequenceRequest

T = TypeVar("T")

Work = Callable[[Callable[[], bool]], T]  # receives should_stop()


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
    """A callback for the worker thread that hands an outcome to ``future``'s event loop."""
    loop = future.get_loop()

    def report(result: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, future, result, error)

    return report


class _Job(Generic[T]):
    def __init__(self, work: Work[T], future: asyncio.Future[T]) -> None:
        self.work = work
        self.future = future
        self.cancelled = threading.Event()

    def run(self) -> None:
        """Run on the worker thread and hand the outcome to the event loop."""
        result: Any = None
        error: BaseException | None = None
        try:
            result = self.work(self.cancelled.is_set)
        except Exception as exc:
            error = exc
        _reporter(self.future)(result, error)


class ModelWorker:
    """Runs one model's work on its own thread; at most ``max_queue`` requests wait.

    ``batch`` is the model's continuous batch; without one, :meth:`generate` is unavailable.
    """

    def __init__(self, name: str, max_queue: int, batch: ContinuousBatch | None = None) -> None:
        self.name = name
        self._max_queue = max_queue
        self._batch = batch
        self._waiting: deque[_Job[Any] | SequenceRequest] = deque()
        self._running: _Job[Any] | None = None
        self._closed = False
        self._wakeup = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"model-{name}", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting or running on this model."""
        active = self._batch.active if self._batch is not None else 0
        return len(self._waiting) + active + (self._running is not None)

    def _enqueue(self, item: _Job[Any] | SequenceRequest) -> None:
        with self._wakeup:
            if self._closed:
                raise ModelUnavailableError(f"Model '{self.name}' is shutting down.")
            if len(self._waiting) >= self._max_queue:
                waiting = len(self._waiting)
                raise OverloadedError(f"Model '{self.name}' is busy: {waiting} requests are already waiting.")
            self._waiting.append(item)
            self._wakeup.notify()

    async def _wait(self, item: _Job[Any] | SequenceRequest, future: asyncio.Future[T]) -> T:
        try:
            return await future
        except asyncio.CancelledError:
            item.cancelled.set()
            with self._wakeup:
                if item in self._waiting:
                    self._waiting.remove(item)
            raise

    async def run(self, work: Work[T]) -> T:
        """Queue ``work`` and wait for its result; cancelling the wait cancels the job."""
        job: _Job[T] = _Job(work, asyncio.get_running_loop().create_future())
        self._enqueue(job)
        return await self._wait(job, job.future)

    async def generate(self, prompt: Sequence[int], budget: int, eos_ids: Collection[int]) -> Generated:
        """Greedy-decode ``prompt`` in the model's continuous batch (at most ``budget`` new tokens).

        Cancelling the wait removes the sequence from the batch at the next step.
        """
        if self._batch is None:
            raise RuntimeError(f"worker {self.name!r} has no decode batch")
        future: asyncio.Future[Generated] = asyncio.get_running_loop().create_future()
        request = SequenceRequest(prompt, budget, eos_ids, _reporter(future))
        self._enqueue(request)
        return await self._wait(request, future)

    def _loop(self) -> None:
        batch = self._batch
        idle = lambda: not self._waiting and not (batch and batch.active) and not self._closed  # noqa: E731
        worked = False  # since memory was last given back
        while True:
            with self._wakeup:
                going_idle = worked and idle()
            if going_idle:
                release_free_memory()
                worked = False
            admitted: list[SequenceRequest] = []
            with self._wakeup:
                while idle():
                    self._wakeup.wait()
                worked = True
                if self._closed:
                    break
                # Sequences at the head of the queue join while the batch has room; a job
                # there runs alone once none were admitted, keeping arrival order.
                while self._waiting and batch is not None and batch.active + len(admitted) < batch.max_batch:
                    head = self._waiting[0]
                    if not isinstance(head, SequenceRequest):
                        break
                    admitted.append(head)
                    self._waiting.popleft()
                if self._waiting and not admitted and isinstance(self._waiting[0], _Job):
                    self._running = self._waiting[0]
                    self._waiting.popleft()
            job = self._running
            for request in admitted:
                if batch is not None and not request.cancelled.is_set():
                    batch.admit(request)
            if job is not None and not job.cancelled.is_set():
                job.run()
            if batch and batch.active:
                batch.step()
            with self._wakeup:
                self._running = None
        if batch is not None:
            batch.fail_all(ModelUnavailableError(f"Model '{self.name}' is shutting down."))

    async def close(self) -> None:
        """Fail waiting work, stop running work at its next step and wait for the thread."""
        with self._wakeup:
            self._closed = True
            jobs = [*self._waiting, *([self._running] if self._running else [])]
            self._waiting.clear()
            self._wakeup.notify()
        for job in jobs:
            job.cancelled.set()
            if isinstance(job, _Job):
                _settle(job.future, None, ModelUnavailableError(f"Model '{self.name}' is shutting down."))
            else:
                job.finish(None, ModelUnavailableError(f"Model '{self.name}' is shutting down."))
        await asyncio.to_thread(self._thread.join)
