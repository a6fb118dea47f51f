"""Remote engines (issue 14): the platform's overhead on top of a remote engine, and local vs remote.

1. Overhead. The same streamed chat request (the summarize operation's prompt for a short fixed text,
   ``max_sentences`` 1, greedy, ``max_tokens`` the operation's cap: the body the platform itself sends)
   (a) straight to the engine's ``/v1/chat/completions``, (b) as ``POST /operations/summarize`` to an
   ``ai-platform serve`` whose summarize maps to that engine. (b) - (a) is what the platform adds: the HTTP
   hop, auth, validation, the limit and usage transactions, audit, relaying the engine's stream. Engines:
   llama.cpp's server on the demo GGUF (``.cache/llama-venv``, as ``tests/remote``) and an instant engine
   (``tests/remote_fake.py``'s fake OpenAI server, answering at once, in a process of its own), sequential
   (one client) and with ``--clients`` clients sending back to back.
2. Local vs remote. summarize (four news texts, up to 3 sentences) and classify (the classify plugin's
   shipped examples, each sent once over the rounds: accuracy) on three ``ai-platform serve``: the demo model
   in the platform's own runtime (ONNX); the same operations on llama.cpp's server (the same weights: our
   demo folder is an int4 export of that GGUF; ``choose=logprobs``); on a second AI Platform
   (``OPENAI_API=true``, its ``chat`` operation; ``choose=generate``).

Every client keeps one keep-alive connection (httpx), which counts the same on both sides of a difference.
Rounds alternate the order of the contenders; tables give medians of the rounds' p50s.

    .venv/bin/python bench/remote_engines.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _server import KEY, ROOT, bench_env, start_server
from concurrency import TEXTS, percentile

sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "remote")]

DEMO = ROOT / "models" / "smollm2-135m-instruct"
TEXT = "The meeting moved to Thursday. Bring the budget figures and the draft contract."
OVERHEAD_REQUEST = {"text": TEXT, "max_sentences": 1}
LLAMA_KEY_ENV = "BENCH_LLAMA_KEY"
PLATFORM_KEY_ENV = "BENCH_PLATFORM_ENGINE_KEY"
INSTANT_MODEL = "instant"
INSTANT_CHUNKS = ("The meeting", " moved to", " Thursday.")

Call = Callable[[httpx.Client], tuple[float, int, dict[str, Any]]]


# -- the instant engine, in a process of its own -----------------------------------------------------------


def fake_main() -> None:
    """``_fake``: tests/remote_fake.py's server answering every chat request at once; prints its port."""
    from remote_fake import FakeOpenAIServer, Reply

    server = FakeOpenAIServer(model=INSTANT_MODEL)
    server.default = Reply(chunks=INSTANT_CHUNKS, usage=len(INSTANT_CHUNKS))
    print(server.port, flush=True)
    while True:  # the requests it records are dropped now and then: it serves thousands
        time.sleep(5)
        server.requests.clear()


@contextmanager
def instant_engine() -> Iterator[str]:
    process = subprocess.Popen([sys.executable, __file__, "_fake"], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- servers --------------------------------------------------------------------------------------------


def remote(base_url: str, model: str, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"openai+{base_url}{'?' + query if query else ''}#{model}"


@contextmanager
def front(folder: Path, models: dict[str, str], **extra: str) -> Iterator[int]:
    """``ai-platform serve`` (summarize and classify only) with ``models`` as its OPERATION_MODEL_MAP."""
    folder.mkdir(parents=True)
    env = bench_env(folder, DEMO, MODELS_DIR=str(DEMO.parent), ENABLED_PLUGINS="summarize,classify")
    env |= {"OPERATION_MODEL_MAP": json.dumps(models), "MAX_QUEUE_PER_MODEL": "64", **extra}
    server, port = start_server(env, folder, output=folder / "server.log")
    try:
        yield port
    finally:
        server.terminate()
        server.wait(timeout=60)


# -- one request ----------------------------------------------------------------------------------------


def platform_call(port: int, operation: str, body: dict[str, Any], *, errors: bool = False) -> Call:
    """``errors``: an error status is an answer (``{"status": ...}``), not a failure of the benchmark."""
    url = f"http://127.0.0.1:{port}/operations/{operation}"

    def call(client: httpx.Client) -> tuple[float, int, dict[str, Any]]:
        started = time.perf_counter()
        response = client.post(url, json=body, headers={"X-API-Key": KEY})
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            if errors:
                return elapsed, 0, {"status": response.status_code, "error": response.text[:300]}
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
        answer = response.json()
        return elapsed, int(answer["meta"]["output_tokens"]), answer

    return call


def engine_body(model: str) -> dict[str, Any]:
    """The body the platform's remote engine sends for ``OVERHEAD_REQUEST`` (its streamed chat request)."""
    from ai_platform.remote.engine import _chat_body
    from ai_platform_summarize import OPERATION, SummarizeRequest, prompt

    call = prompt(SummarizeRequest(**OVERHEAD_REQUEST))  # type: ignore[arg-type]
    assert OPERATION.limits.max_output_tokens is not None
    body = _chat_body(model, call.messages, max_tokens=OPERATION.limits.max_output_tokens, stream=True)
    return body | {"stream_options": {"include_usage": True}, "temperature": 0.0}


def direct_call(base_url: str, model: str, api_key: str | None) -> Call:
    url = f"{base_url}/chat/completions"
    body = engine_body(model)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def call(client: httpx.Client) -> tuple[float, int, dict[str, Any]]:
        started = time.perf_counter()
        with client.stream("POST", url, json=body, headers=headers) as response:
            raw = response.read()
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {raw[:300]!r}")
        return elapsed, _stream_tokens(raw), {}

    return call


def _stream_tokens(raw: bytes) -> int:
    """``usage.completion_tokens`` if the stream sent it, else its content chunks (llama.cpp: one a token)."""
    chunks = 0
    for line in raw.decode().splitlines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        event = json.loads(line[5:])
        if event.get("usage"):
            return int(event["usage"]["completion_tokens"])
        choices = event.get("choices") or [{}]
        if (choices[0].get("delta") or {}).get("content"):
            chunks += 1
    return chunks


# -- measuring ------------------------------------------------------------------------------------------


@dataclass
class Runs:
    """One contender's samples: per round its latencies (s), and over all rounds tokens and wall time."""

    rounds: list[list[float]] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    wall: float = 0.0
    correct: int = 0
    scored: int = 0
    failed: int = 0  # error answers (classify with choose=generate: an answer naming no category is a 502)

    def add(self, latencies: list[float], tokens: int, wall: float) -> None:
        self.rounds.append(latencies)
        self.tokens += tokens
        self.requests += len(latencies)
        self.wall += wall

    @property
    def p50(self) -> float:
        """The median of the rounds' p50s."""
        return statistics.median(statistics.median(r) for r in self.rounds)

    @property
    def p95(self) -> float:
        return percentile([t for r in self.rounds for t in r], 0.95)

    def round_p50s(self, scale: float) -> str:
        return ", ".join(f"{statistics.median(r) * scale:.2f}" for r in self.rounds)


def sequential(call: Call, count: int) -> tuple[list[float], int, float]:
    """``count`` requests back to back on one connection (opened by a first request, not counted)."""
    latencies, tokens = [], 0
    with httpx.Client(timeout=600) as client:
        call(client)
        started = time.perf_counter()
        for _ in range(count):
            elapsed, produced, _ = call(client)
            latencies.append(elapsed)
            tokens += produced
        return latencies, tokens, time.perf_counter() - started


def concurrent(call: Call, clients: int, each: int) -> tuple[list[float], int, float]:
    """``clients`` threads, each sending ``each`` requests back to back on its own connection."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def client_thread() -> None:
        with httpx.Client(timeout=600) as client:
            call(client)  # connect (and warm) before the clock starts
            barrier.wait()
            try:
                for _ in range(each):
                    elapsed, produced, _ = call(client)
                    with lock:
                        latencies.append(elapsed)
                        tokens[0] += produced
            except BaseException as error:  # re-raised in the main thread
                errors.append(error)

    threads = [threading.Thread(target=client_thread) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return latencies, tokens[0], time.perf_counter() - started


def load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


# -- 1. overhead ----------------------------------------------------------------------------------------


def overhead(
    engines: dict[str, tuple[Call, Call, int, int]], rounds: int, clients: int
) -> dict[tuple[str, str, str], Runs]:
    """``engines``: name → (direct call, platform call, sequential requests, requests per concurrent client)."""
    results: dict[tuple[str, str, str], Runs] = {}
    for name, (direct, through, count, each) in engines.items():
        paths = {"direct": direct, "platform": through}
        for call in paths.values():
            sequential(call, max(3, count // 10))  # warm-up: connections, caches, the first transactions
        for number in range(rounds):
            order = list(paths.items()) if number % 2 == 0 else list(paths.items())[::-1]
            for path, call in order:
                latencies, tokens, wall = sequential(call, count)
                results.setdefault((name, "1", path), Runs()).add(latencies, tokens, wall)
            for path, call in order:
                latencies, tokens, wall = concurrent(call, clients, each)
                results.setdefault((name, str(clients), path), Runs()).add(latencies, tokens, wall)
        print(f"  {name}: done, load average {load()}", file=sys.stderr, flush=True)
    return results


def print_overhead(results: dict[tuple[str, str, str], Runs]) -> None:
    columns = [
        "engine", "clients", "direct p50 ms", "through the platform p50 ms", "**overhead p50 ms**", "x direct",
        "rounds' p50 ms (direct; platform)", "p95 ms (direct; platform)", "requests/s (direct; platform)",
        "output tokens/request (direct; platform)", "requests",
    ]  # fmt: skip
    print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for (name, level, path), direct in results.items():
        if path != "direct":
            continue
        platform = results[(name, level, "platform")]
        d, p = direct.p50 * 1000, platform.p50 * 1000
        print(
            f"| {name} | {level} | {d:.2f} | {p:.2f} | **{p - d:.2f}** | {p / d:.2f} | "
            f"{direct.round_p50s(1000)}; {platform.round_p50s(1000)} | "
            f"{direct.p95 * 1000:.2f}; {platform.p95 * 1000:.2f} | "
            f"{direct.requests / direct.wall:.1f}; {platform.requests / platform.wall:.1f} | "
            f"{direct.tokens / direct.requests:.1f}; {platform.tokens / platform.requests:.1f} | "
            f"{direct.requests} + {platform.requests} |"
        )


# -- 2. local vs remote ---------------------------------------------------------------------------------


def local_vs_remote(fronts: dict[str, int], rounds: int, examples: list[Any]) -> dict[tuple[str, str], Runs]:
    """Each front in turn (the order rotating each round): the summaries, then its share of the examples."""
    summaries = [{"text": text, "max_sentences": 3} for text in TEXTS]
    results: dict[tuple[str, str], Runs] = {}
    clients = {name: httpx.Client(timeout=600) for name in fronts}  # one keep-alive connection each
    for name, port in fronts.items():  # warm-up: one of each
        platform_call(port, "summarize", summaries[0])(clients[name])
        platform_call(port, "classify", dict(examples[0].request), errors=True)(clients[name])
    names = list(fronts)
    for number in range(rounds):
        order = names[number % len(names) :] + names[: number % len(names)]
        for name in order:
            port, client = fronts[name], clients[name]
            latencies, tokens = [], 0
            for body in summaries:
                elapsed, produced, _ = platform_call(port, "summarize", body)(client)
                latencies.append(elapsed)
                tokens += produced
            results.setdefault(("summarize", name), Runs()).add(latencies, tokens, sum(latencies))
            runs = results.setdefault(("classify", name), Runs())
            latencies, tokens = [], 0
            for example in examples[number::rounds]:
                elapsed, produced, answer = platform_call(port, "classify", dict(example.request), errors=True)(client)
                latencies.append(elapsed)
                tokens += produced
                runs.scored += 1
                runs.correct += answer.get("label") == example.expected["label"]
                runs.failed += "status" in answer
            runs.add(latencies, tokens, sum(latencies))
        print(f"  round {number + 1}: done, load average {load()}", file=sys.stderr, flush=True)
    for client in clients.values():
        client.close()
    return results


def print_local_vs_remote(results: dict[tuple[str, str], Runs], local: str) -> None:
    columns = [
        "operation", "served by", "p50 s", "x local", "rounds' p50 s", "p95 s", "output tok/s",
        "output tokens/request", "accuracy", "requests",
    ]  # fmt: skip
    print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for (operation, name), runs in results.items():
        base = results[(operation, local)].p50
        generates = operation == "summarize"  # classify's tokens are a label's (or choose=generate's answer)
        tok_s = f"{runs.tokens / runs.wall:.1f}" if generates else "-"
        per_request = f"{runs.tokens / runs.requests:.1f}" if generates else "-"
        accuracy = "-"
        if runs.scored:
            accuracy = f"{100 * runs.correct / runs.scored:.1f} % ({runs.correct}/{runs.scored})"
            accuracy += f", {runs.failed} errors" if runs.failed else ""
        print(
            f"| {operation} | {name} | {runs.p50:.3f} | {runs.p50 / base:.2f} | {runs.round_p50s(1)} | "
            f"{runs.p95:.3f} | {tok_s} | {per_request} | {accuracy} | {runs.requests} |"
        )


# -- main -----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients of the overhead's second run")
    parser.add_argument("--llama-requests", type=int, default=15, help="sequential requests per round, llama.cpp")
    parser.add_argument("--llama-each", type=int, default=4, help="requests per concurrent client, llama.cpp")
    parser.add_argument("--instant-requests", type=int, default=200, help="sequential, instant engine")
    parser.add_argument("--instant-each", type=int, default=50, help="per concurrent client, instant engine")
    parser.add_argument("--examples", type=int, default=70, help="classify examples (0: no accuracy part)")
    parser.add_argument("--skip", choices=("overhead", "local"), action="append", default=[])
    args = parser.parse_args()

    import remote_engines
    from ai_platform_classify import OPERATION as CLASSIFY

    examples = list(CLASSIFY.examples())[: args.examples]
    started = time.monotonic()
    print(f"load average at start {load()}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        (folder / "llama").mkdir()
        llama = stack.enter_context(remote_engines.llama_server(folder / "llama"))
        os.environ[LLAMA_KEY_ENV] = llama.api_key  # the fronts read it (?key_env=), and nothing else does
        llama_url = remote(llama.base_url, llama.model, key_env=LLAMA_KEY_ENV)
        via_llama = stack.enter_context(front(folder / "front-llama", {"summarize": llama_url, "classify": llama_url}))
        load_overhead = load_local = ""
        if "overhead" not in args.skip:
            instant_url = stack.enter_context(instant_engine())
            via_instant = stack.enter_context(
                front(folder / "front-instant", {"summarize": remote(instant_url, INSTANT_MODEL)})
            )
            print("1. overhead", file=sys.stderr, flush=True)
            engines = {
                "llama.cpp server": (
                    direct_call(llama.base_url, llama.model, llama.api_key),
                    platform_call(via_llama, "summarize", OVERHEAD_REQUEST),
                    args.llama_requests,
                    args.llama_each,
                ),
                "instant engine": (
                    direct_call(instant_url, INSTANT_MODEL, None),
                    platform_call(via_instant, "summarize", OVERHEAD_REQUEST),
                    args.instant_requests,
                    args.instant_each,
                ),
            }
            load_overhead = load()
            overhead_results = overhead(engines, args.rounds, args.clients)
            load_overhead += f" → {load()}"
        if "local" not in args.skip:
            (folder / "engine-platform").mkdir()
            engine = stack.enter_context(remote_engines.platform_engine(folder / "engine-platform", DEMO))
            os.environ[PLATFORM_KEY_ENV] = engine.api_key
            platform_url = remote(engine.base_url, engine.model, key_env=PLATFORM_KEY_ENV, choose="generate")
            fronts = {
                "local (ONNX runtime)": stack.enter_context(
                    front(folder / "front-local", {"summarize": DEMO.name, "classify": DEMO.name})
                ),
                "llama.cpp server": via_llama,
                "second AI Platform": stack.enter_context(
                    front(folder / "front-platform", {"summarize": platform_url, "classify": platform_url})
                ),
            }
            print("2. local vs remote", file=sys.stderr, flush=True)
            load_local = load()
            local_results = local_vs_remote(fronts, args.rounds, examples)
            load_local += f" → {load()}"
    minutes = (time.monotonic() - started) / 60
    print(f"\n{args.rounds} rounds, alternating; {os.cpu_count()} CPUs; total {minutes:.1f} min")
    if "overhead" not in args.skip:
        print(
            f"\n1. summarize `{OVERHEAD_REQUEST}`, the same streamed chat request straight to the engine vs "
            f"POST /operations/summarize; {args.clients} clients: each sends back to back. "
            f"Load average (1/5/15 min) {load_overhead}"
        )
        print_overhead(overhead_results)
    if "local" not in args.skip:
        print(
            f"\n2. summarize: {len(TEXTS)} texts (max_sentences 3) per round; classify: {len(examples)} shipped "
            f"examples, split over the rounds; one client. Load average {load_local}"
        )
        print_local_vs_remote(local_results, "local (ONNX runtime)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_fake"]:
        fake_main()
    else:
        main()
