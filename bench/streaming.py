"""How soon a streaming translate shows its first words, against the runtime's own time to first token.

Three measurements, alternating, one request at a time on the same model:

- the runtime alone: ``InferenceEngine.stream`` in this process (process isolation, as served),
  time from the call to the first text delta — the time to first token plus detokenising;
- the real server (``ai-platform serve``) with ``Accept: text/event-stream``: time from sending
  the request to the first ``delta`` event on the wire;
- the same request without streaming: time to the whole answer.

The difference between the first two is what HTTP, auth, limits and SSE add before the first
words. Medians of ``--runs`` rounds over a few texts.

    .venv/bin/python bench/streaming.py models/smollm2-135m-instruct [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from _server import KEY, bench_env, start_server

from ai_platform.operations import Generate
from ai_platform.runtime.engine import InferenceEngine
from ai_platform_translate import TranslateRequest, prompt

TEXTS = [
    "The quarterly earnings report exceeded all analyst expectations.",
    "Please send the signed contract back to our office before Friday.",
    "The museum will stay open late on Thursdays during the summer.",
]


def body(text: str) -> dict[str, str]:
    return {"text": text, "source_language": "en", "target_language": "fr"}


async def runtime_first_delta(engine: InferenceEngine, text: str) -> float:
    call = prompt(TranslateRequest(text=text, source_language="en", target_language="fr"))
    assert isinstance(call, Generate)
    started = time.perf_counter()
    stream = engine.stream("translate", call, max_output_tokens=512)
    first = await anext(stream)
    elapsed = time.perf_counter() - started
    assert isinstance(first, str)
    async for _ in stream:
        pass
    return elapsed


async def http_first_delta(client: httpx.AsyncClient, text: str) -> float:
    started = time.perf_counter()
    elapsed = None
    headers = {"X-API-Key": KEY, "Accept": "text/event-stream"}
    async with client.stream("POST", "/operations/translate", json=body(text), headers=headers) as response:
        async for line in response.aiter_lines():
            if elapsed is None and line.startswith("event: delta"):
                elapsed = time.perf_counter() - started
    assert elapsed is not None, "no delta event"
    return elapsed


async def http_whole(client: httpx.AsyncClient, text: str) -> float:
    started = time.perf_counter()
    response = await client.post("/operations/translate", json=body(text), headers={"X-API-Key": KEY})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="served model folder")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    model = args.model.resolve()
    folder = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    # Without the redact example: a plugin wrapping responses turns deltas off (README, "Streaming").
    env = bench_env(
        folder,
        model,
        PREFIX_CACHE_MB="0",
        OPERATION_MODEL_MAP=json.dumps({"translate": "qwen-translate"}),
        ENABLED_PLUGINS="translate",
    )
    server, port = start_server(env, folder)
    engine = InferenceEngine(model.parent, {"translate": model.name}, execution_provider="cpu", prefix_cache_bytes=0)
    await engine.start()
    times: dict[str, list[float]] = {
        "runtime: first delta": [],
        "HTTP stream: first delta": [],
        "HTTP: whole answer": [],
    }
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            await http_whole(client, TEXTS[0])  # warm-up
            await runtime_first_delta(engine, TEXTS[0])
            for _ in range(args.runs):
                for text in TEXTS:
                    times["runtime: first delta"].append(await runtime_first_delta(engine, text))
                    times["HTTP stream: first delta"].append(await http_first_delta(client, text))
                    times["HTTP: whole answer"].append(await http_whole(client, text))
    finally:
        await engine.close()
        server.terminate()
        server.wait(30)
    base = statistics.median(times["runtime: first delta"])
    print(f"\ntranslate en→fr, {len(TEXTS)} texts x {args.runs} rounds, alternating; medians")
    print("| measurement | ms | minus the runtime's first delta, ms |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values) * 1000
        print(f"| {name} | {median:.1f} | {median - base * 1000:+.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
