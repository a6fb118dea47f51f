"""Crash safety: a worker killed with SIGKILL under load loses nothing and counts nothing twice."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest

from harness import ServerProcess, query
from support import ADMIN, KEY, SUMMARIZE

pytestmark = pytest.mark.slow

LIMIT = 80
SLOW = {**SUMMARIZE, "text": "SLOW " + str(SUMMARIZE["text"])}


async def _post_all(base_url: str, body: dict[str, object], count: int) -> list[int]:
    """Status codes of ``count`` concurrent requests; 0 where the connection died."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=httpx.Limits(max_connections=count)) as client:

        async def one() -> int:
            try:
                return (await client.post("/operations/summarize", json=body, headers=KEY)).status_code
            except httpx.TransportError:
                return 0

        return list(await asyncio.gather(*(one() for _ in range(count))))


def _usage(base_url: str) -> int:
    usage = httpx.get(f"{base_url}/limits/usage", headers=KEY, timeout=30).json()["usage"]
    return int(next(u["request_count"] for u in usage if u["operation"] == "summarize"))


def _wait(condition: object, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkilled_worker_counts_exactly_the_200s(serve: object, database_url: str) -> None:
    server: ServerProcess = serve(database_url, workers=2, FAKE_DELAY="0.02", FAKE_SLOW="4")  # type: ignore[operator]
    assert (
        httpx.put(
            f"{server.base_url}/limits", headers=ADMIN, json={"operation": "summarize", "daily_limit": LIMIT}
        ).status_code
        == 200
    )

    async def load() -> tuple[list[int], list[int]]:
        before = await _post_all(server.base_url, SUMMARIZE, 20)
        in_flight = asyncio.ensure_future(_post_all(server.base_url, SLOW, 40))
        # Every slow request admitted (reserved) and inside the model: kill the worker holding most of them.
        await asyncio.to_thread(_wait, lambda: len(query(database_url, "SELECT id FROM reservation")) == 40)
        [(victim, held)] = await asyncio.to_thread(
            query, database_url, "SELECT pid, COUNT(*) FROM reservation GROUP BY pid ORDER BY 2 DESC LIMIT 1"
        )
        assert int(held) > 0  # type: ignore[call-overload]
        next(w for w in server.workers() if w.pid == victim).kill()
        return before, await in_flight

    before, during = asyncio.run(load())
    assert before == [200] * 20
    outcome = Counter(during)
    assert outcome[0] > 0 and set(outcome) <= {0, 200}, outcome  # the killed worker's requests died with it

    # uvicorn restarts the worker; at startup it gives back the dead worker's reservations.
    server.wait_ready(workers=3)
    served = before.count(200) + outcome[200]
    assert query(database_url, "SELECT COUNT(*) FROM reservation") == [(0,)]
    assert _usage(server.base_url) == served

    # And the allowance left is exactly what the 200s did not use.
    after = asyncio.run(_post_all(server.base_url, SUMMARIZE, 100))
    assert Counter(after) == {200: LIMIT - served, 429: 100 - (LIMIT - served)}
    assert _usage(server.base_url) == LIMIT
