"""Per-request platform overhead: HTTP + auth + validation + limits + usage + plugin, without the model.

Serves the real app (real uvicorn socket, SQLite usage database, built-in plugins) in
this process with a stub engine that answers instantly, and times requests from a
client thread. The stub's own time is measured too (calling the runtime directly);
the difference is what the platform adds to every request.

    .venv/bin/python bench/overhead.py [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from _server import bench_env, free_port, post

from ai_platform.app import create_app
from ai_platform.operations import Choice, Choose, Completion, Generate
from ai_platform.runtime.engine import ModelStatus
from ai_platform.settings import Settings

TEXT = "The meeting moved to Thursday. Bring the budget figures and the draft contract."


class InstantEngine:
    """An engine whose model calls cost nothing, so only the platform's own time remains."""

    def __init__(self, operations: dict[str, str]) -> None:
        self._operations = operations

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def status(self) -> list[ModelStatus]:
        return [ModelStatus(op, model, model, True, "stub", None) for op, model in self._operations.items()]

    def model_name(self, operation: str) -> str:
        return self._operations[operation]

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion:
        return Completion(text="The meeting moved to Thursday.", output_tokens=7, finish_reason="stop")

    async def choose(self, operation: str, call: Choose) -> Choice:
        return Choice(scores={option: 1 / len(call.options) for option in call.options}, output_tokens=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_mapping(bench_env(Path(tmp), Path(tmp)))
        engine = InstantEngine(dict(settings.operation_model_map))
        port = free_port()
        config = uvicorn.Config(create_app(settings, engine=engine), port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        body = {"text": TEXT, "max_sentences": 1}
        http = []
        for k in range(args.requests + 20):  # the first 20 warm up
            started = time.perf_counter()
            status, answer = post(port, "/operations/summarize", body)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {answer}")
            if k >= 20:
                http.append(time.perf_counter() - started)
        server.should_exit = True
        thread.join()

    async def direct_calls() -> list[float]:
        times = []
        for _ in range(args.requests):
            started = time.perf_counter()
            await engine.generate("summarize", Generate(messages=[]), max_output_tokens=64)
            times.append(time.perf_counter() - started)
        return times

    direct = asyncio.run(direct_calls())
    p50_http, p50_direct = statistics.median(http) * 1000, statistics.median(direct) * 1000
    p95_http = sorted(http)[int(0.95 * (len(http) - 1))] * 1000
    print(f"\n{args.requests} sequential summarize requests, instant engine")
    print("| path | p50 ms | p95 ms |")
    print("|---|---|---|")
    print(f"| HTTP through the platform | {p50_http:.2f} | {p95_http:.2f} |")
    print(f"| engine called directly | {p50_direct:.3f} | |")
    print(f"\nplatform overhead p50: {p50_http - p50_direct:.2f} ms")


if __name__ == "__main__":
    main()
