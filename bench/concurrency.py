"""Aggregate tokens/s and latency through the HTTP server at 1, 4, 8 and 16 concurrent clients.

Starts ``.venv/bin/ai-platform serve`` on a model folder with throwaway settings; each
client sends requests back to back for ``--seconds`` (and waits for its last answer);
the table gives aggregate output tokens/s (all answers' tokens over the level's wall
time), the ratio to one client, and p50/p95 latency over all requests of a level, plus the
server's peak RSS. Two workloads: ``summarize`` (short news texts, answers of a few
dozen tokens: prefill is most of the work) and ``translate`` (paragraphs translated
to French, answers of a few hundred tokens: decoding is most of the work).

    .venv/bin/python bench/concurrency.py models/smollm2-135m-instruct [--workload translate] [--seconds 60]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from _server import bench_env, peak_rss_mb, post, start_server

TEXTS = (
    "The city council met on Tuesday to discuss the new bus routes. Residents asked for more evening "
    "services and for a stop near the hospital. The council promised a decision by the end of May.",
    "Our team moved the billing system to the new servers over the weekend. Two invoices were sent twice; "
    "both customers were refunded on Monday. No other problems were reported.",
    "The library will close for renovation from June to August. Books can be returned at the town hall, "
    "and the children's reading club will meet in the school gym during the summer.",
    "Sales of the new phone were lower than expected in the first quarter, mostly because of delays at "
    "the factory. The company expects the second quarter to be better as supply returns to normal.",
)


PARAGRAPHS = (
    " ".join(TEXTS[:2]) + " The next meeting will take place in the old school building on the first Monday of June.",
    " ".join(TEXTS[2:]) + " Both announcements were published in the town's weekly newsletter on Friday morning.",
)
WORKLOADS = {
    "summarize": ("/operations/summarize", [{"text": t, "max_sentences": 3} for t in TEXTS]),
    "translate": (
        "/operations/translate",
        [{"text": t, "source_language": "en", "target_language": "fr"} for t in PARAGRAPHS],
    ),
}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def level(port: int, workload: str, clients: int, seconds: float) -> tuple[float, list[float], int]:
    """``clients`` threads sending requests back to back (at least one each), none started after ``seconds``.

    Returns (wall seconds until the last answer, latencies, output tokens of all answers).
    """
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    path, bodies = WORKLOADS[workload]
    started = time.perf_counter()

    def client(index: int) -> None:
        k = 0
        while k == 0 or time.perf_counter() - started < seconds:
            sent = time.perf_counter()
            status, body = post(port, path, bodies[(index + k) % len(bodies)])
            elapsed = time.perf_counter() - sent
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body}")
            with lock:
                latencies.append(elapsed)
                tokens[0] += int(body["meta"]["output_tokens"])  # type: ignore[index, call-overload]
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies, tokens[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="served model folder")
    parser.add_argument("--workload", choices=WORKLOADS, default="summarize")
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=60, help="per level: no request starts after this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = bench_env(Path(tmp), args.model, MAX_QUEUE_PER_MODEL="64")
        server, port = start_server(env, Path(tmp))
        try:
            level(port, args.workload, 1, 0)  # warm-up: one request
            rows = []
            for clients in (int(c) for c in args.levels.split(",")):
                wall, latencies, tokens = level(port, args.workload, clients, args.seconds)
                rows.append(
                    (clients, tokens / wall, statistics.median(latencies), percentile(latencies, 0.95), len(latencies))
                )
            rss = peak_rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
    base = rows[0][1]
    print(
        f"\nmodel {args.model}, {args.workload}, clients send for {args.seconds:g} s per level; "
        f"server peak RSS {rss:.0f} MB"
    )
    print("| clients | aggregate tok/s | x one client | p50 s | p95 s | requests |")
    print("|---|---|---|---|---|---|")
    for clients, rate, p50, p95, n in rows:
        print(f"| {clients} | {rate:.1f} | {rate / base:.2f} | {p50:.2f} | {p95:.2f} | {n} |")


if __name__ == "__main__":
    main()
