"""What ``logprobs`` cost a generation: decode speed without them, with ``logprobs=0`` and with 20 alternatives.

One engine on the model (process isolation, as served), one request at a time, the three
variants alternating within each round so that load on the machine hits them alike. Greedy on
one prompt, so every variant decodes the same tokens (up to ``--new-tokens``); tok/s counts the
whole call (prefill included, as a client sees it). Prints the median tok/s of each variant and
its ratio to the run without logprobs.

    .venv/bin/python bench/logprobs.py models/smollm2-135m-instruct [--rounds 5] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from ai_platform.operations import Generate, Message
from ai_platform.runtime.engine import InferenceEngine

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
VARIANTS: dict[str, int | None] = {"no logprobs": None, "logprobs, 0 alternatives": 0, "logprobs, 20 alternatives": 20}


async def tokens_per_second(engine: InferenceEngine, logprobs: int | None, new_tokens: int) -> float:
    call = Generate(messages=[Message("user", PROMPT)], logprobs=logprobs)
    started = time.perf_counter()
    completion = await engine.generate("chat", call, max_output_tokens=new_tokens)
    elapsed = time.perf_counter() - started
    if logprobs is not None:
        assert completion.logprobs is not None and len(completion.logprobs) == completion.output_tokens
    return completion.output_tokens / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="served model folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model = args.model.resolve()
    engine = InferenceEngine(model.parent, {"chat": model.name}, execution_provider="cpu", prefix_cache_bytes=0)
    await engine.start()
    speeds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for logprobs in VARIANTS.values():  # warm-up
            await tokens_per_second(engine, logprobs, 8)
        for _ in range(args.rounds):
            for name, logprobs in VARIANTS.items():
                speeds[name].append(await tokens_per_second(engine, logprobs, args.new_tokens))
    finally:
        await engine.close()
    base = statistics.median(speeds["no logprobs"])
    print(f"\n{model.name}: {args.new_tokens} new tokens, {args.rounds} rounds alternating; medians")
    print("| variant | decode tok/s | ÷ no logprobs |")
    print("|---|---|---|")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / base:.3f} |")


if __name__ == "__main__":
    asyncio.run(main())
