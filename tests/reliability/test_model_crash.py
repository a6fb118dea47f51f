"""A native crash in a model does not take the server down (issue 10, crash containment).

The real command, ``ai-platform serve``, runs each model in a child process of its own. Killing
that child mid-request (SIGSEGV, as a heap corruption in onnxruntime would, or SIGKILL) must leave the HTTP
server up: the model's requests in flight are answered 503 with ``Retry-After`` and not
counted, ``/health`` says why the model is down, the model comes back by itself, and the
usage counters equal the 200s the clients received.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest

from harness import ServerProcess, query
from support import ADMIN, KEY, SUMMARIZE

pytestmark = pytest.mark.slow

IN_FLIGHT = 6
LONG = {**SUMMARIZE, "text": "word " * 300, "max_sentences": 10}  # the tiny model decodes to its token limit


def model_processes(server: ServerProcess, workers: int) -> list[psutil.Process]:
    """The model child processes (spawned by the server, or by each of its uvicorn workers)."""
    root = psutil.Process(server.process.pid)
    spawned = [p for p in root.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    return [p for p in spawned if (p.ppid() == root.pid) == (workers == 1)]


def summarize_health(base_url: str) -> dict[str, object]:
    models = httpx.get(f"{base_url}/health", headers=ADMIN, timeout=10).json()["models"]
    return next(m for m in models if m["name"].startswith("summarize"))  # type: ignore[no-any-return]


def summarize_usage(base_url: str) -> int:
    usage = httpx.get(f"{base_url}/limits/usage", headers=KEY, timeout=10).json()["usage"]
    return int(next(u["request_count"] for u in usage if u["operation"] == "summarize"))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_model_process_segfaulting_mid_request_is_survived(
    serve_cli: object, database_url: str, tiny_model_dir: Path, workers: int
) -> None:
    kill_mid_request_and_recover(serve_cli, database_url, tiny_model_dir, workers, signal.SIGSEGV)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database side is the same as SIGSEGV's
def test_a_model_process_killed_mid_request_is_survived(
    serve_cli: object, database_url: str, tiny_model_dir: Path
) -> None:
    """SIGKILL (the kernel's OOM killer, an admin's kill -9): no handler, no faulthandler output, just gone."""
    kill_mid_request_and_recover(serve_cli, database_url, tiny_model_dir, 1, signal.SIGKILL)


def kill_mid_request_and_recover(
    serve_cli: object, database_url: str, tiny_model_dir: Path, workers: int, sig: signal.Signals
) -> None:
    server: ServerProcess = serve_cli(database_url, tiny_model_dir, workers=workers)  # type: ignore[operator]
    children = model_processes(server, workers)
    assert len(children) == workers, [c.cmdline() for c in children]

    async def crash_mid_request() -> tuple[list[httpx.Response], list[dict[str, object]]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            calls = [
                asyncio.ensure_future(client.post("/operations/summarize", json=LONG, headers=KEY))
                for _ in range(IN_FLIGHT)
            ]
            # Every request admitted (a reservation each) and decoding in a model process.
            deadline = time.monotonic() + 60
            while len(await asyncio.to_thread(query, database_url, "SELECT id FROM reservation")) < IN_FLIGHT:
                assert time.monotonic() < deadline, "requests never reached the model"
                await asyncio.sleep(0.02)
            for child in children:
                child.send_signal(sig)
            responses = list(await asyncio.gather(*calls))
            seen = [await asyncio.to_thread(summarize_health, server.base_url)]
            while not seen[-1]["loaded"]:
                assert time.monotonic() < deadline + 60, f"model never came back: {seen[-1]}"
                await asyncio.sleep(0.1)
                seen.append(await asyncio.to_thread(summarize_health, server.base_url))
            return responses, seen

    responses, health = asyncio.run(crash_mid_request())
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503} and statuses[503] >= 1, statuses
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
            # The reason (the signal) is for admins: /health with the admin key, and the log.
            expected = f"Model '{tiny_model_dir.name}' stopped unexpectedly and is restarting; retry shortly."
            assert response.json() == {"detail": expected}
    # /health showed the model down, with the reason, then up again.
    down = [h for h in health if not h["loaded"]]
    assert down and f"killed by {sig.name}" in str(down[0]["error"]), health
    assert health[-1]["loaded"] and health[-1]["error"] is None

    assert server.process.poll() is None, "the server died with its model"
    assert len(server.workers()) >= 1
    replacements = model_processes(server, workers)
    assert len(replacements) == workers and not {p.pid for p in replacements} & {c.pid for c in children}
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        # /health answered from one worker; with two, the other's model may still be loading: its 503s
        # (not counted) last until its replacement is up.
        deadline = time.monotonic() + 60
        while (served := client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 503:
            assert time.monotonic() < deadline, served.text
            time.sleep(0.5)
        assert served.status_code == 200, served.text
    assert query(database_url, "SELECT COUNT(*) FROM reservation") == [(0,)]
    assert summarize_usage(server.base_url) == statuses[200] + 1  # exactly the 200s, nothing of the 503s
    log = server.output.read_text()
    assert f"its process killed by {sig.name}" in log and "restarted in" in log

    # A model process never outlives the server process that started it, however that ends.
    for parent in {p.ppid() for p in replacements}:
        psutil.Process(parent).kill()
    _, alive = psutil.wait_procs(replacements, timeout=15)
    assert not alive, [p.pid for p in alive]
