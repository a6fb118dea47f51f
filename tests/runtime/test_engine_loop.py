"""The engine loop (a model's thread) with jobs: queue bound, cancellation, shutdown."""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import pytest

from ai_platform.errors import ModelUnavailableError, OverloadedError
from runtime_reference import jobs_only_loop

pytestmark = pytest.mark.anyio


class Blocker:
    """Work that runs until released, so the loop stays busy for as long as a test needs."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.saw_stop = False

    def __call__(self, should_stop: Callable[[], bool]) -> str:
        self.started.set()
        while not self.release.wait(0.001):
            if should_stop():
                self.saw_stop = True
                return "stopped"
        return "done"

    async def wait_started(self) -> None:
        await anyio.to_thread.run_sync(self.started.wait, 5)


async def until(condition: Callable[[], bool], seconds: float = 5) -> None:
    """Wait for ``condition`` (polled), failing the test if it does not come true in time."""
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.001)


async def test_results_and_errors_come_back() -> None:
    worker = jobs_only_loop("m", max_queue=4)

    def fail(should_stop: Callable[[], bool]) -> None:
        raise ValueError("boom")

    assert await worker.run(lambda should_stop: 42) == 42
    with pytest.raises(ValueError, match="boom"):
        await worker.run(fail)
    await worker.close()


async def test_full_queue_raises_overloaded() -> None:
    worker = jobs_only_loop("m", max_queue=1)
    blocker = Blocker()
    results: dict[str, str] = {}

    async def run(name: str, work: Callable[[Callable[[], bool]], str]) -> None:
        results[name] = await worker.run(work)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "running", blocker)
        await blocker.wait_started()
        tg.start_soon(run, "waiting", lambda should_stop: "ok")
        await until(lambda: worker.queue_depth == 2)  # one running, one waiting
        with pytest.raises(OverloadedError, match="1 requests are already waiting"):
            await worker.run(lambda should_stop: "rejected")
        blocker.release.set()
    assert results == {"running": "done", "waiting": "ok"}
    await worker.close()


async def test_job_cancelled_before_it_starts_is_dropped() -> None:
    worker = jobs_only_loop("m", max_queue=4)
    blocker = Blocker()
    ran: list[str] = []

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run, blocker)
        await blocker.wait_started()
        with anyio.move_on_after(0.02):
            await worker.run(lambda should_stop: ran.append("cancelled"))
        assert worker.queue_depth == 1  # it left the queue when cancelled, before the blocker ends
        blocker.release.set()
    assert await worker.run(lambda should_stop: "after") == "after"
    assert ran == []
    await worker.close()


async def test_running_job_sees_should_stop_when_cancelled() -> None:
    worker = jobs_only_loop("m", max_queue=4)
    blocker = Blocker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run, blocker)
        await blocker.wait_started()
        tg.cancel_scope.cancel()
    assert await worker.run(lambda should_stop: "free again") == "free again"
    assert blocker.saw_stop
    await worker.close()


async def test_close_fails_waiting_and_running_jobs() -> None:
    worker = jobs_only_loop("m", max_queue=4)
    blocker = Blocker()
    errors: list[BaseException] = []

    async def run(work: Callable[[Callable[[], bool]], object]) -> None:
        try:
            await worker.run(work)
        except ModelUnavailableError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, blocker)
        await blocker.wait_started()
        tg.start_soon(run, lambda should_stop: "never")
        await until(lambda: worker.queue_depth == 2)  # one running, one waiting
        await worker.close()
    assert len(errors) == 2
    assert blocker.saw_stop
    with pytest.raises(ModelUnavailableError, match="shutting down"):
        await worker.run(lambda should_stop: "late")
