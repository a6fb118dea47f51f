"""A client that hangs up stops its request's work, and the request is not counted.

Over real sockets (uvicorn in this event loop): Litestar's AsyncTestClient runs one request at
a time and never disconnects. The client hangs up at each stage of a request: while it is
being admitted (the usage database holds it), while the model works (a fake one), and in the
middle of a real generation on the tiny model, whose sequence must leave the batch at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from ai_platform.app import create_app
from ai_platform.services.orchestration import OrchestrationService
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from ai_platform.usage import statements
from support import ADMIN, CLIENT_KEY, KEY, SEED_MODELS, SUMMARIZE, TRANSLATE

pytestmark = pytest.mark.anyio


async def eventually(condition: Callable[[], bool], seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.005)


@asynccontextmanager
async def live_server(app: Any) -> AsyncIterator[tuple[uvicorn.Server, httpx.AsyncClient]]:
    """``app`` served by uvicorn on a free local port in this event loop, and a client for it.

    Requests run concurrently, as in production (Litestar's AsyncTestClient runs one at a time).
    Other test modules use it too (``from test_disconnect import live_server``).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_config=None, timeout_graceful_shutdown=1))
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or serving.done(), seconds=60)
        assert server.started, "the server did not start"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield server, client
    finally:
        server.should_exit = True
        await serving


async def send_and_hang_up_later(port: int, path: str, body: dict[str, object]) -> asyncio.StreamWriter:
    """Send a whole request on a raw connection and return it open (close it to hang up)."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n".encode()
        + f"X-API-Key: {CLIENT_KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    return writer


def port_of(server: uvicorn.Server) -> int:
    return int(server.config.port)


async def request_counts(client: httpx.AsyncClient) -> dict[str, int]:
    usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
    return {u["operation"]: u["request_count"] for u in usage}


def reservations(env: dict[str, str]) -> int:
    connection = sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite://"))
    try:
        return int(connection.execute("SELECT COUNT(*) FROM reservation").fetchone()[0])
    finally:
        connection.close()


async def test_disconnect_cancels_generation_and_is_not_counted(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), delay=60)
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (server, client):
        writer = await send_and_hang_up_later(port_of(server), "/operations/summarize", SUMMARIZE)
        await eventually(lambda: len(engine.calls) == 1)  # the request reached the model
        writer.close()
        await eventually(lambda: engine.cancelled == 1)  # and hanging up stopped it
        await eventually(lambda: not server.server_state.tasks)  # the request is over
        assert await request_counts(client) == {"summarize": 0, "translate": 0, "classify": 0}
        assert reservations(env) == 0


async def test_disconnect_during_admission_takes_no_place(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # The admission transaction waits (on the usage database's thread) until the client has hung up.
    in_admission, go_on, admission_done = threading.Event(), threading.Event(), threading.Event()
    run = statements.SqliteRunner._run

    def held_admission(self: statements.SqliteRunner, transaction: Any) -> Any:
        if getattr(transaction, "__name__", None) != "admission":
            return run(self, transaction)
        in_admission.set()
        go_on.wait(30)
        try:
            return run(self, transaction)
        finally:
            admission_done.set()

    requests: list[asyncio.Task[Any]] = []  # the task running each request (hanging up cancels it)
    run_request = OrchestrationService.run

    async def watched_run(self: OrchestrationService, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        assert task is not None
        requests.append(task)
        return await run_request(self, *args, **kwargs)

    monkeypatch.setattr(statements.SqliteRunner, "_run", held_admission)
    monkeypatch.setattr(OrchestrationService, "run", watched_run)
    engine = FakeEngine(models=dict(SEED_MODELS))
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (server, client):
        writer = await send_and_hang_up_later(port_of(server), "/operations/summarize", SUMMARIZE)
        await asyncio.to_thread(in_admission.wait, 10)
        assert in_admission.is_set() and len(requests) == 1
        writer.close()
        [task] = requests
        await eventually(lambda: task.cancelling() > 0 or task.done())  # the hang-up reached the request
        go_on.set()
        await asyncio.to_thread(admission_done.wait, 10)
        await eventually(lambda: task.done() and not server.server_state.tasks)
        assert engine.calls == []  # it never reached the model
        assert await request_counts(client) == {"summarize": 0, "translate": 0, "classify": 0}
        assert reservations(env) == 0


async def test_many_clients_hanging_up_at_once_take_no_place(env: dict[str, str]) -> None:
    """The red team's run (issue 11 #1): clients send a request and hang up at once, so that the
    cancellations land everywhere: before admission, during it, and in the model call."""
    engine = FakeEngine(models=dict(SEED_MODELS), delay=60)  # none can finish: each one is a 499
    async with live_server(create_app(Settings.from_mapping(env), engine=engine)) as (server, client):
        for _ in range(3):
            writers = await asyncio.gather(
                *(send_and_hang_up_later(port_of(server), "/operations/summarize", SUMMARIZE) for _ in range(20))
            )
            for writer in writers:
                writer.close()
        await eventually(lambda: not server.server_state.tasks, seconds=30)
        assert await request_counts(client) == {"summarize": 0, "translate": 0, "classify": 0}
        assert reservations(env) == 0


# -- the real runtime ------------------------------------------------------------------------

# The model in this process, where the test can slow its forward passes down (the engine's
# default may be a child process).
IN_THIS_PROCESS = {"MODEL_ISOLATION": "thread"}


class SlowForward:
    """Counts the tiny model's forward passes and makes each take ``delay`` seconds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
        from ai_platform.runtime.onnx_model import OnnxDecoder

        self.calls = 0
        self.delay = delay
        forward = OnnxDecoder.forward

        def slow_forward(decoder: OnnxDecoder, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            time.sleep(self.delay)
            return forward(decoder, *args, **kwargs)

        monkeypatch.setattr(OnnxDecoder, "forward", slow_forward)


def tiny_seed_env(env: dict[str, str], tiny_model_dir: Path, **overrides: str) -> dict[str, str]:
    """The seed's model folders, all the tiny model, served in this process."""
    models = Path(env["MODELS_DIR"])
    models.mkdir(parents=True, exist_ok=True)
    for folder in SEED_MODELS.values():
        (models / folder).symlink_to(tiny_model_dir, target_is_directory=True)
    return {**env, **IN_THIS_PROCESS, **overrides}


async def queue_depth(client: httpx.AsyncClient, operation: str) -> int:
    """The model's ``queue_depth`` (waiting + running + in the batch), as /metrics reports it."""
    metrics = (await client.get("/metrics", headers=ADMIN)).text
    [line] = [
        line
        for line in metrics.splitlines()
        if line.startswith("ai_platform_queue_depth{") and f'operation="{operation}"' in line
    ]
    return int(float(line.rsplit(" ", 1)[1]))


async def until_depth(client: httpx.AsyncClient, operation: str, depth: int, seconds: float = 20) -> None:
    async with asyncio.timeout(seconds):
        while await queue_depth(client, operation) != depth:
            await asyncio.sleep(0.005)


async def test_disconnect_mid_generation_on_the_tiny_model_leaves_the_batch_and_is_not_counted(
    env: dict[str, str], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = SlowForward(monkeypatch, delay=0.01)  # 512 new tokens would take over 5 s
    settings = Settings.from_mapping(tiny_seed_env(env, tiny_model_dir))
    async with live_server(create_app(settings)) as (server, client):
        writer = await send_and_hang_up_later(port_of(server), "/operations/summarize", SUMMARIZE)
        await until_depth(client, "summarize", 1)
        started = forward.calls
        await eventually(lambda: forward.calls >= started + 5)  # it decodes
        writer.close()
        await until_depth(client, "summarize", 0)  # its sequence left the batch
        left_at = forward.calls
        assert left_at < 200, "it decoded on for nobody"
        await eventually(lambda: not server.server_state.tasks)
        assert await request_counts(client) == {"summarize": 0, "translate": 0, "classify": 0}
        assert reservations(env) == 0
        assert forward.calls == left_at  # nothing runs for it any more
        forward.delay = 0
        r = await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)  # the model serves on
        assert r.status_code == 200 and r.json()["meta"]["output_tokens"] == 512
        assert (await request_counts(client))["summarize"] == 1


def audit_statuses(env: dict[str, str], path: str) -> list[int]:
    connection = sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite://"))
    try:
        query = "SELECT status FROM audit_record WHERE path = ? ORDER BY id"
        return [int(row[0]) for row in connection.execute(query, (path,))]
    finally:
        connection.close()


async def test_an_abandoned_stream_on_the_tiny_model_leaves_the_batch_and_is_not_counted(
    env: dict[str, str], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streaming counterpart: a client reading a long translation as events hangs up after the first one."""
    forward = SlowForward(monkeypatch, delay=0.01)  # 512 new tokens would take over 5 s
    settings = Settings.from_mapping(tiny_seed_env(env, tiny_model_dir))
    stream = {**KEY, "Accept": "text/event-stream"}
    async with live_server(create_app(settings)) as (server, client):
        async with client.stream("POST", "/operations/translate", json=TRANSLATE, headers=stream) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("event: delta"):
                    break  # it decodes: hang up after its first words
            hung_up_at = forward.calls
        await until_depth(client, "translate", 0)  # its sequence left the batch
        left_at = forward.calls
        assert left_at - hung_up_at < 100, "it decoded on for nobody"
        await eventually(lambda: not server.server_state.tasks)
        assert await request_counts(client) == {"summarize": 0, "translate": 0, "classify": 0}
        assert reservations(env) == 0
        await eventually(lambda: audit_statuses(env, "/operations/translate") == [499])  # abandoned, not served
        assert forward.calls == left_at  # nothing runs for it any more
        forward.delay = 0
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)  # the model serves on
        assert r.status_code == 200 and r.json()["meta"]["output_tokens"] > left_at - hung_up_at
        assert (await request_counts(client))["translate"] == 1
