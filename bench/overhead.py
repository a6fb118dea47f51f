"""Per-request platform overhead: HTTP + auth + validation + limits + usage + plugin, without the model.

Serves the real app (uvicorn, SQLite usage database, built-in plugins, audit) in a
process of its own with an engine that answers instantly, and times sequential
requests from this process over one keep-alive connection (as nginx's upstream
keepalive does, reading each answer by its Content-Length). The instant engine's own
time is measured too (calling the runtime directly); the difference is what the
platform adds to every request.
Rounds alternate between uvicorn's fast stack (uvloop + httptools, what
``ai-platform serve`` uses) and its pure-Python one (asyncio + h11).

    .venv/bin/python bench/overhead.py [--requests 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _server import KEY, bench_env, start_server

TEXT = "The meeting moved to Thursday. Bring the budget figures and the draft contract."
STACKS = {"uvloop + httptools": ("uvloop", "httptools"), "asyncio + h11": ("asyncio", "h11")}


def serve(folder: Path, loop: str, http_impl: str) -> tuple[subprocess.Popen[bytes], int]:
    command = [sys.executable, str(Path(__file__).with_name("_instant_server.py")), loop, http_impl]
    return start_server(bench_env(folder, folder), folder, command)


def timed_requests(port: int, count: int) -> list[float]:
    """Send the same request ``count`` times on one keep-alive connection; each one's round trip.

    The request bytes are built once and the answer is read by its Content-Length, as a
    proxy would: Python's ``http.client`` spends ~0.2 ms per response parsing headers with
    the ``email`` package, which is the client's time, not the platform's.
    """
    body = json.dumps({"text": TEXT, "max_sentences": 1}).encode()
    request = (
        f"POST /operations/summarize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-API-Key: {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    times = []
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for k in range(count + 50):  # the first 50 warm up
            started = time.perf_counter()
            connection.sendall(request)
            status, answer = _read_response(connection)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {answer[:200]!r}")
            if k >= 50:
                times.append(time.perf_counter() - started)
    return times


def _read_response(connection: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(rest) < length:
        rest += connection.recv(65536)
    return int(head.split(b" ", 2)[1]), rest


def direct_calls(count: int) -> list[float]:
    from _instant_server import instant_engine

    from ai_platform.operations import Generate

    engine = instant_engine({"summarize": "stub"})

    async def calls() -> list[float]:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            await engine.generate("summarize", Generate(messages=[]), max_output_tokens=64)
            times.append(time.perf_counter() - started)
        return times

    return asyncio.run(calls())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    http_times: dict[str, list[float]] = {name: [] for name in STACKS}
    round_p50: dict[str, list[float]] = {name: [] for name in STACKS}
    for _ in range(args.rounds):
        for name, (loop, http_impl) in STACKS.items():
            with tempfile.TemporaryDirectory() as tmp:
                server, port = serve(Path(tmp), loop, http_impl)
                try:
                    times = timed_requests(port, args.requests)
                finally:
                    server.terminate()
                    server.wait()
            http_times[name] += times
            round_p50[name].append(statistics.median(times) * 1000)
    direct = statistics.median(direct_calls(args.requests)) * 1000
    print(f"\n{args.requests} sequential summarize requests per round, {args.rounds} rounds, instant engine")
    print("| path | p50 ms (median of rounds) | rounds' p50 ms | p95 ms | overhead p50 ms |")
    print("|---|---|---|---|---|")
    for name, times in http_times.items():
        p50 = statistics.median(round_p50[name])
        p95 = sorted(times)[int(0.95 * (len(times) - 1))] * 1000
        rounds = ", ".join(f"{v:.2f}" for v in round_p50[name])
        print(f"| HTTP, {name} | {p50:.2f} | {rounds} | {p95:.2f} | {p50 - direct:.2f} |")
    print(f"| engine called directly | {direct:.3f} | | | |")


if __name__ == "__main__":
    main()
