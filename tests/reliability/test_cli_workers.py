"""The real command, ``ai-platform serve --workers 2``, on a real model: limits stay exact across its workers.

The other multi-process tests run the app over the fake engine (``serve_fake.py``), which they
need to hold requests in flight or kill a worker at a chosen moment. This one runs what an admin
runs: the installed ``ai-platform`` command, its settings from the environment, uvicorn's worker
processes, the ONNX runtime on the tiny test model, and one log file written by both workers.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest

from harness import ServerProcess
from support import ADMIN, CLASSIFY, KEY

pytestmark = pytest.mark.slow

LIMIT = 10
AUDIT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ai_platform\.audit: request method=(GET|POST|PUT) path=(\S+) "
    r"operation=\S+ key_id=([0-9a-f]{16}|-) status=(\d{3}) duration_ms=\d+\.\d tokens=\d+ request_id=\S+$"
)


def _workers(server: ServerProcess) -> list[psutil.Process]:
    """uvicorn's worker processes (multiprocessing's resource tracker is a child too)."""
    children = psutil.Process(server.process.pid).children()
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


def _connected_workers(server: ServerProcess) -> set[int]:
    """The worker processes holding a client connection to the server's port now."""
    return {
        worker.pid
        for worker in _workers(server)
        if any(c.laddr and c.laddr.port == server.port and c.raddr for c in worker.net_connections("tcp"))
    }


def test_two_workers_of_the_real_command_admit_exactly_the_limit(
    serve_cli: object, database_url: str, tiny_model_dir: Path
) -> None:
    # Small log files, so that the two workers rotate the shared log several times during the test.
    server: ServerProcess = serve_cli(  # type: ignore[operator]
        database_url, tiny_model_dir, workers=2, LOG_MAX_BYTES="2048", LOG_BACKUP_COUNT="500"
    )
    workers = _workers(server)
    assert len(workers) == 2, [w.cmdline() for w in psutil.Process(server.process.pid).children()]
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        r = client.put("/limits", headers=ADMIN, json={"operation": "classify", "daily_limit": LIMIT})
        assert r.status_code == 200, r.text

    async def burst() -> tuple[list[httpx.Response], set[int]]:
        limits = httpx.Limits(max_connections=4 * LIMIT, max_keepalive_connections=4 * LIMIT)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
            responses = await asyncio.gather(
                *(client.post("/operations/classify", json=CLASSIFY, headers=KEY) for _ in range(4 * LIMIT))
            )
            # Still open (keep-alive): which workers accepted the burst's connections.
            return list(responses), await asyncio.to_thread(_connected_workers, server)

    responses, served_by = asyncio.run(burst())
    assert Counter(r.status_code for r in responses) == {200: LIMIT, 429: 3 * LIMIT}, [r.text for r in responses]
    remaining = sorted(int(r.headers["X-RateLimit-Remaining"]) for r in responses if r.status_code == 200)
    assert remaining == list(range(LIMIT))  # each admission saw its own count, whichever worker ran it
    assert all(r.json()["label"] in CLASSIFY["categories"] for r in responses if r.status_code == 200)
    assert served_by == {w.pid for w in workers}, "the burst did not reach both workers"

    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for _ in range(4):  # the same answer from either worker
            usage = {u["operation"]: u for u in client.get("/limits/usage", headers=KEY).json()["usage"]}
            assert (usage["classify"]["request_count"], usage["classify"]["remaining"]) == (LIMIT, 0)
            assert usage["summarize"]["request_count"] == 0
        assert client.post("/operations/classify", json=CLASSIFY, headers=KEY).status_code == 429

    # Both workers wrote one log file through several rotations: each request's line is there, whole, once.
    logs = Path(server.output).parent / "logs"
    deadline = time.monotonic() + 10  # a request's line is written just after its response is sent
    while True:
        files = [logs / "platform.log", *logs.glob("platform.log.[0-9]*")]
        audit = [line for f in files for line in f.read_text().splitlines() if " ai_platform.audit: " in line]
        classified = Counter(m[4] for m in map(AUDIT_LINE.match, audit) if m and m[2] == "/operations/classify")
        if classified == {"200": LIMIT, "429": 3 * LIMIT + 1} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert classified == {"200": LIMIT, "429": 3 * LIMIT + 1}
    assert len(files) >= 3, files  # platform.log and at least two backups
    assert all(AUDIT_LINE.match(line) for line in audit), [line for line in audit if not AUDIT_LINE.match(line)]
