"""A client that hangs up stops its request's model work, and the request is not counted."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable

import httpx
import pytest
import uvicorn

from ai_platform.app import create_app
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from support import CLIENT_KEY, KEY, SEED_MODELS, SUMMARIZE

pytestmark = pytest.mark.anyio


async def eventually(condition: Callable[[], bool], seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.02)


async def test_disconnect_cancels_generation_and_is_not_counted(env: dict[str, str]) -> None:
    engine = FakeEngine(models=dict(SEED_MODELS), delay=60)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(Settings.from_mapping(env), engine=engine),
            port=port,
            log_config=None,
            timeout_graceful_shutdown=1,
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started)
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps(SUMMARIZE).encode()
        writer.write(
            b"POST /operations/summarize HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"X-API-Key: {CLIENT_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await eventually(lambda: len(engine.calls) == 1)  # the request reached the model
        writer.close()
        await eventually(lambda: engine.cancelled == 1)  # and hanging up stopped it
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        assert all(u["request_count"] == 0 for u in usage)
    finally:
        server.should_exit = True
        await serving
