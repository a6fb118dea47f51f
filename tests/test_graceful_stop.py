"""Stopping the real server as systemd does (issue 11 #16): requests in flight finish, nothing is left to kill.

deploy/systemd/ai-platform.service stops the service with ``KillMode=mixed``: SIGTERM to the server
process only, then, once ``TimeoutStopSec`` has run out, SIGKILL to whatever is left in its cgroup. The
server must therefore finish its requests in flight (queued ones included), close its model processes
itself and exit by itself, well within ``TimeoutStopSec``. systemd's default ``KillMode=control-group``
(SIGTERM to every process, the model processes too) is checked as well: the model processes ignore
SIGTERM, so the requests in flight still finish.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from support import ADMIN, CLASSIFY, KEY, SEED_MODELS, SUMMARIZE, TRANSLATE, free_port

pytestmark = pytest.mark.slow

REQUESTS = [("summarize", SUMMARIZE), ("translate", TRANSLATE), ("classify", CLASSIFY)] * 3
QUEUE_DEPTH = re.compile(r"^ai_platform_queue_depth\{[^}]*\} (\d+(?:\.\d+)?)$", re.MULTILINE)


def in_flight(base: str) -> int:
    """Requests waiting or running on the model (one model serves all three operations: one series each)."""
    metrics = httpx.get(f"{base}/metrics", headers=ADMIN, timeout=10).text
    return int(max(float(n) for n in QUEUE_DEPTH.findall(metrics)))


@pytest.mark.parametrize("kill_mode", ["mixed", "control-group"])
def test_sigterm_lets_requests_in_flight_finish_and_leaves_no_process(
    env: dict[str, str], tiny_model_dir: Path, tmp_path: Path, kill_mode: str
) -> None:
    models = Path(env["MODELS_DIR"])
    models.mkdir()
    for folder in SEED_MODELS.values():
        (models / folder).symlink_to(tiny_model_dir, target_is_directory=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # One sequence at a time: the requests queue up behind each other, so SIGTERM finds several waiting.
    variables = {**os.environ, **env, "MAX_BATCH_PER_MODEL": "1", "MODEL_ISOLATION": "process"}
    cli = Path(sys.executable).parent / "ai-platform"
    server = subprocess.Popen([str(cli), "serve", "--port", str(port)], env=variables, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                httpx.get(f"{base}/health", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                assert server.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        assert len(tree) >= 2, "no model process: MODEL_ISOLATION=process should start one"

        results: list[int | str] = []

        def call(operation: str, body: dict[str, object]) -> None:
            try:
                response = httpx.post(f"{base}/operations/{operation}", json=body, headers=KEY, timeout=120)
                results.append(response.status_code)
            except httpx.HTTPError as exc:
                results.append(repr(exc))

        threads = [threading.Thread(target=call, args=request) for request in REQUESTS]
        for thread in threads:
            thread.start()
        # Every request is on the model (queued or running) or answered before the SIGTERM: one still connecting
        # would be refused, rightly, since a stopping server accepts no new connection (seen under load).
        deadline = time.monotonic() + 60
        while (depth := in_flight(base)) + len(results) < len(REQUESTS) or depth < 1:
            assert time.monotonic() < deadline and len(results) < len(REQUESTS), ("requests never queued up", results)
            time.sleep(0.02)
        stopping = time.monotonic()
        for process in tree if kill_mode == "control-group" else tree[:1]:
            process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=120)
        assert results == [200] * len(REQUESTS), (depth, results)
        # uvicorn ends by raising the SIGTERM it caught again, after its shutdown: systemd counts a service
        # ended by SIGTERM as stopped cleanly (not "failed"), so Restart=on-failure does not restart it.
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        took = time.monotonic() - stopping
        # Nothing left over for systemd's SIGKILL: the model processes ended with the server.
        _, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, alive
        print(f"{kill_mode}: {depth} requests in flight at SIGTERM; all answered 200; stopped in {took:.1f} s")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
