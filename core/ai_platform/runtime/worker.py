"""A dedicated thread per loaded model, with a bounded queue of jobs from the event loop.

Jobs run one at a time, in arrival order. A job whose caller was cancelled
before it started is dropped; one cancelled while running sees its
``should_stop`` callback turn true and stops at the next decoding step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ai_platform.errors import ModelUnavailableError, OverloadedError

T = TypeVar("T")

Work = Callable[[Callable[[], bool]], T]  # receives should_stop()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled by the caller or failed by close()
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Job(Generic[T]):
    def __init__(self, work: Work[T], loop: asyncio.AbstractEventLoop) -> None:
        self.work = work
        self.loop = loop
        self.future: asyncio.Future[T] = loop.create_future()
        self.cancelled = threading.Event()

    def run(self) -> None:
        """Run on the worker thread and hand the outcome to the event loop."""
        result: Any = None
        error: BaseException | None = None
        try:
            result = self.work(self.cancelled.is_set)
        except Exception as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


class ModelWorker:
    """Runs one model's jobs on its own thread; at most ``max_queue`` jobs wait."""

    def __init__(self, name: str, max_queue: int) -> None:
        self.name = name
        self._max_queue = max_queue
        self._waiting: deque[_Job[Any]] = deque()
        self._running: _Job[Any] | None = None
        self._closed = False
        self._wakeup = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"model-{name}", daemon=True)
        self._thread.start()

    async def run(self, work: Work[T]) -> T:
        """Queue ``work`` and wait for its result; cancelling the wait cancels the job."""
        job: _Job[T] = _Job(work, asyncio.get_running_loop())
        with self._wakeup:
            if self._closed:
                raise ModelUnavailableError(f"Model '{self.name}' is shutting down.")
            if len(self._waiting) >= self._max_queue:
                waiting = len(self._waiting)
                raise OverloadedError(f"Model '{self.name}' is busy: {waiting} requests are already waiting.")
            self._waiting.append(job)
            self._wakeup.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled.set()
            with self._wakeup:
                if job in self._waiting:
                    self._waiting.remove(job)
            raise

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._waiting and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
            if not job.cancelled.is_set():
                job.run()
            with self._wakeup:
                self._running = None

    async def close(self) -> None:
        """Fail waiting jobs, stop the running one at its next step and wait for the thread."""
        with self._wakeup:
            self._closed = True
            jobs = [*self._waiting, *([self._running] if self._running else [])]
            self._waiting.clear()
            self._wakeup.notify()
        for job in jobs:
            job.cancelled.set()
            _settle(job.future, None, ModelUnavailableError(f"Model '{self.name}' is shutting down."))
        await asyncio.to_thread(self._thread.join)
