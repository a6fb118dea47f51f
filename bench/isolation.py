"""What running a model in its own process (MODEL_ISOLATION=process) costs per call.

Two engines over the same model folder, one with ``isolation="thread"`` (the model in this
process) and one with ``isolation="process"`` (a supervised child process, the default),
called in alternation so both see the same machine load: a call that does no model work, a
classify-style choice, a one-token generation (prefill and the round trip, nothing else) and a 32-token generation,
one call at a time, then 8 concurrent 32-token generations. Prints medians over all
rounds, the difference in ms and the ratio process ÷ thread, and the memory of each.

    .venv/bin/python bench/isolation.py models/smollm2-135m-instruct [--rounds 5] [--calls 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
from concurrency import TEXTS

from ai_platform.operations import Choose, Generate, Message
from ai_platform.runtime.engine import InferenceEngine

LABELS = ["politics", "business", "culture", "technology"]


def messages(text: str) -> list[Message]:
    return [Message("user", f"Summarize in one sentence: {text}")]


def cases(engine: InferenceEngine) -> dict[str, Callable[[int], Awaitable[object]]]:
    def text(index: int) -> str:
        return TEXTS[index % len(TEXTS)]

    async def concurrent(index: int) -> object:
        calls = [
            engine.generate("op", Generate(messages=messages(text(index + k))), max_output_tokens=32) for k in range(8)
        ]
        return await asyncio.gather(*calls)

    return {
        # No model work (a budget of 0 finishes at admission): tokenising and the round trip only.
        "generate 0 tokens": lambda i: engine.generate("op", Generate(messages=messages(text(i))), max_output_tokens=0),
        "choose (classify)": lambda i: engine.choose("op", Choose(messages=messages(text(i)), options=LABELS)),
        "generate 1 token": lambda i: engine.generate("op", Generate(messages=messages(text(i))), max_output_tokens=1),
        "generate 32 tokens": lambda i: engine.generate(
            "op", Generate(messages=messages(text(i))), max_output_tokens=32
        ),
        "8 concurrent x 32 tokens": concurrent,
    }


def rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="served model folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="calls per case and round")
    args = parser.parse_args()
    folder = args.model.resolve()
    engines = {
        isolation: InferenceEngine(folder.parent, {"op": folder.name}, execution_provider="cpu", isolation=isolation)
        for isolation in ("thread", "process")
    }
    baseline = rss_mb(os.getpid())
    await engines["thread"].start()
    with_thread = rss_mb(os.getpid()) - baseline
    await engines["process"].start()
    with_process = rss_mb(os.getpid()) - baseline - with_thread
    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up both
        for isolation, engine in engines.items() if round_ % 2 else reversed(engines.items()):
            for case, call in cases(engine).items():
                for index in range(args.calls):
                    started = time.perf_counter()
                    await call(index)
                    if round_:
                        times.setdefault((case, isolation), []).append((time.perf_counter() - started) * 1000)
    print(f"{args.rounds} rounds x {args.calls} calls per case, alternating; medians in ms")
    print("| call | thread ms | process ms | difference ms | process ÷ thread |")
    print("|---|---|---|---|---|")
    for case in cases(engines["thread"]):
        thread = statistics.median(times[(case, "thread")])
        process = statistics.median(times[(case, "process")])
        print(f"| {case} | {thread:.2f} | {process:.2f} | {process - thread:+.2f} | {process / thread:.3f} |")
    print(f"\nmemory after loading: thread {with_thread:.0f} MB in the server; process {with_process:.0f} MB (child)")
    for engine in engines.values():
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
