"""Stop a request's work when its client disconnects, so no model time is spent on nobody."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from litestar import Request

from ai_platform.errors import ClientDisconnectedError

T = TypeVar("T")


async def _wait_for_disconnect(request: Request[Any, Any, Any]) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise :class:`ClientDisconnectedError`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            # Let the cancellation finish: the reservation is released on the way out.
            await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
    if task.cancelled() and watcher.done() and not watcher.cancelled():
        raise ClientDisconnectedError()
    return task.result()
