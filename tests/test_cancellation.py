"""A request cancelled at any point (its client hung up, or it timed out) leaves nothing taken (issue 11 #1).

Cancellation can land before admission, while the admission transaction waits for the usage
database's thread or runs on it, once it has committed but before the request heard of it,
during the model call, during the release that follows, and during the commit. Each case runs
the orchestrator on a real SQLite database, with the database thread held at the right moment,
and checks what stays counted and reserved afterwards.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ai_platform.limits.service import LimitService
from ai_platform.operations import Operation
from ai_platform.services.orchestration import OrchestrationService
from ai_platform.testing import FakeEngine
from ai_platform.usage import statements
from ai_platform.usage.database import Database
from ai_platform.usage.models import DailyUsage, KeyDailyUsage
from ai_platform.usage.models import Reservation as ReservationRow
from support import SUMMARIZE

pytestmark = pytest.mark.anyio


class Hooks:
    def build_model_call(self, operation: Operation, request: Any) -> Any:
        return operation.prompt(request)

    def build_response(self, operation: Operation, request: Any, result: Any, meta: Any) -> Any:
        return operation.respond(request, result, meta)


def kind_of(transaction: Any) -> str:
    """``admission``, ``commit`` or ``release`` (a settlement with or without tokens)."""
    name = getattr(transaction, "__name__", "")
    if name == "settlement":
        return "release" if transaction.gi_frame.f_locals["tokens"] is None else "commit"
    return str(name)


@dataclass
class HeldDatabase:
    """Holds the usage database's thread: before one kind of transaction runs, or while it runs.

    ``hold("admission")``: the next admission waits on the thread until ``go_on`` (it is
    running: its statements run once let go). ``busy()``: the thread is taken by something else,
    so transactions submitted meanwhile wait in its queue (they have not started).
    """

    usage: Database
    held: str | None = None
    started: threading.Event = field(default_factory=threading.Event)
    go_on: threading.Event = field(default_factory=threading.Event)
    ran: list[str] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)  # handed to the thread (queued, running or ran)
    after: Callable[[str], None] | None = None  # called on the thread after each transaction ran

    def hold(self, kind: str) -> None:
        self.held = kind
        self.started.clear()
        self.go_on.clear()

    def busy(self) -> threading.Event:
        """Take the thread until the returned event is set."""
        free = threading.Event()
        runner = self.usage.transactions()
        assert isinstance(runner, statements.SqliteRunner)
        runner._thread.submit(free.wait, 30)
        return free

    def queued(self, kind: str) -> bool:
        """Whether a transaction of ``kind`` was handed to the thread and has not run yet."""
        return self.submitted.count(kind) > self.ran.count(kind)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        run = statements.SqliteRunner._run
        submit = statements.SqliteRunner.run

        async def recorded_submit(runner: statements.SqliteRunner, transaction: Any) -> Any:
            # No await before run_in_executor: once another task sees this entry, the thread has the transaction.
            self.submitted.append(kind_of(transaction))
            return await submit(runner, transaction)

        def held_run(runner: statements.SqliteRunner, transaction: Any) -> Any:
            kind = kind_of(transaction)
            if kind == self.held:
                self.held = None
                self.started.set()
                self.go_on.wait(30)
            result = run(runner, transaction)
            self.ran.append(kind)
            if self.after is not None:
                self.after(kind)
            return result

        monkeypatch.setattr(statements.SqliteRunner, "_run", held_run)
        monkeypatch.setattr(statements.SqliteRunner, "run", recorded_submit)


@dataclass
class Setup:
    orchestration: OrchestrationService
    engine: FakeEngine
    db: HeldDatabase
    operation: Operation
    request: Any

    def start(self) -> asyncio.Task[Any]:
        return asyncio.ensure_future(self.orchestration.run(self.operation, self.request, key_id="key-1"))

    async def counts(self) -> tuple[int, int, int, int]:
        """Requests counted on the operation and on the key, their tokens, and reservations left."""
        operation = await DailyUsage.filter(operation="summarize").first()
        key = await KeyDailyUsage.filter(operation="summarize", key_id="key-1").first()
        return (
            operation.request_count if operation else 0,
            key.request_count if key else 0,
            operation.total_tokens if operation else 0,
            await ReservationRow.all().count(),
        )


@pytest.fixture
async def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    import msgspec

    from ai_platform_summarize import OPERATION, SummarizeRequest

    db = HeldDatabase(Database(f"sqlite://{tmp_path / 'usage.sqlite3'}"))
    db.install(monkeypatch)
    engine = FakeEngine(delay=0.3)
    limits = LimitService(db.usage, {"summarize": OPERATION}, default_daily_limit=10)
    orchestration = OrchestrationService({"summarize": OPERATION}, engine, limits, hooks=Hooks())
    request = msgspec.convert(SUMMARIZE, SummarizeRequest)
    async with db.usage.opened():
        yield Setup(orchestration, engine, db, OPERATION, request)


async def eventually(condition: Callable[[], bool], seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.002)


async def cancelled(task: asyncio.Task[Any]) -> None:
    """Wait for ``task`` to end; it must end cancelled."""
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelled_before_admission(setup: Setup) -> None:
    task = setup.start()
    task.cancel()  # before it ran at all
    await cancelled(task)
    assert setup.db.ran == [] and setup.engine.calls == []
    assert await setup.counts() == (0, 0, 0, 0)


async def test_cancelled_while_admission_waits_for_the_database_thread(setup: Setup) -> None:
    free = setup.db.busy()
    task = setup.start()
    await eventually(lambda: setup.db.queued("admission"))  # queued behind the busy thread
    task.cancel()
    await asyncio.sleep(0)  # the cancellation reaches the task (it then waits to give back what it may take)
    assert setup.db.queued("admission") and not task.done()
    free.set()
    await cancelled(task)
    assert setup.engine.calls == []
    assert await setup.counts() == (0, 0, 0, 0)


async def test_cancelled_while_admission_runs_on_the_database_thread(setup: Setup) -> None:
    """The red team's case: the transaction commits after the request was cancelled."""
    setup.db.hold("admission")
    task = setup.start()
    await asyncio.to_thread(setup.db.started.wait, 10)
    task.cancel()
    await asyncio.sleep(0)  # the cancellation reaches the task while its admission still runs
    assert setup.db.ran == [] and not task.done()
    setup.db.go_on.set()
    await cancelled(task)
    assert setup.engine.calls == []  # it never reached the model
    assert setup.db.ran == ["admission", "release"]  # what it took was given back
    assert await setup.counts() == (0, 0, 0, 0)


async def test_cancelled_once_admission_committed_before_the_request_heard_of_it(setup: Setup) -> None:
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Any]] = []

    def cancel_after_admission(kind: str) -> None:  # on the database thread, the transaction committed
        if kind == "admission":
            loop.call_soon_threadsafe(tasks[0].cancel)

    setup.db.after = cancel_after_admission
    tasks.append(setup.start())
    await cancelled(tasks[0])
    assert setup.engine.calls == []
    assert setup.db.ran == ["admission", "release"]
    assert await setup.counts() == (0, 0, 0, 0)


async def test_cancelled_as_admission_returns(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """The admission's result is ready, but the cancellation reaches the request before it resumes."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Any]] = []
    reserve = LimitService._reserve

    async def reserve_then_cancel(self: LimitService, *args: Any) -> Any:
        reservation = await reserve(self, *args)
        # Two loop turns later: after the admission's result was handed over, before the request ran on.
        loop.call_soon(loop.call_soon, tasks[0].cancel)
        return reservation

    monkeypatch.setattr(LimitService, "_reserve", reserve_then_cancel)
    tasks.append(setup.start())
    await cancelled(tasks[0])
    assert await setup.counts() == (0, 0, 0, 0)


async def test_cancelled_during_the_model_call(setup: Setup) -> None:
    task = setup.start()
    await eventually(lambda: len(setup.engine.calls) == 1)
    task.cancel()
    await cancelled(task)
    assert setup.engine.cancelled == 1
    assert setup.db.ran == ["admission", "release"]
    assert await setup.counts() == (0, 0, 0, 0)


async def test_cancelled_again_while_the_release_waits_for_the_database_thread(setup: Setup) -> None:
    """A second cancellation (e.g. the server shutting down) must not drop the queued release."""
    task = setup.start()
    await eventually(lambda: len(setup.engine.calls) == 1)
    free = setup.db.busy()
    task.cancel()
    await eventually(lambda: setup.db.queued("release"))  # queued behind the busy thread
    task.cancel()
    await asyncio.sleep(0)  # the second cancellation reaches the task
    assert setup.db.queued("release")
    free.set()
    await cancelled(task)
    await eventually(lambda: "release" in setup.db.ran)
    assert await setup.counts() == (0, 0, 0, 0)


@pytest.mark.parametrize("where", ["queued", "running"])
async def test_cancelled_during_the_commit_is_counted_once(setup: Setup, where: str) -> None:
    """Once the commit started it runs to its end: counted, as README documents for this window."""
    setup.engine.delay = 0
    if where == "running":
        setup.db.hold("commit")
        task = setup.start()
        await asyncio.to_thread(setup.db.started.wait, 10)
        task.cancel()
        setup.db.go_on.set()
    else:
        setup.db.hold("admission")  # hold the thread until the request is past admission
        task = setup.start()
        await asyncio.to_thread(setup.db.started.wait, 10)
        free = setup.db.busy()  # queued behind the admission
        setup.db.go_on.set()
        await eventually(lambda: setup.db.ran == ["admission"])
        await eventually(lambda: setup.db.queued("commit"))  # queued behind the busy thread
        task.cancel()
        await asyncio.sleep(0)  # the cancellation reaches the task
        assert setup.db.queued("commit")
        free.set()
    await cancelled(task)
    await eventually(lambda: "commit" in setup.db.ran)
    requests, key_requests, tokens, reserved = await setup.counts()
    assert (requests, key_requests, reserved) == (1, 1, 0)
    assert tokens > 0


async def test_a_request_that_is_not_cancelled_is_counted(setup: Setup) -> None:
    setup.engine.delay = 0
    outcome = await setup.start()
    assert setup.db.ran == ["admission", "commit"]
    assert await setup.counts() == (1, 1, outcome.output_tokens, 0)
