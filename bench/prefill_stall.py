"""How long a decoding sequence stalls when a long prompt arrives: whole prefill vs chunked, interleaved.

One sequence is decoding when a ``--long``-token prompt joins the batch. With the
prompt prefilled without a pause (here in one pass; before the scheduler interleaved
chunks, they ran back to back), the decoding sequence gets no token until the whole
prompt is done; with chunks of
``PREFILL_CHUNK`` tokens interleaved with decode steps, it waits one chunk at a time.
Prints the longest gap between the decoding sequence's tokens and the long prompt's
time to first token, medians of ``--runs``.

    .venv/bin/python bench/prefill_stall.py models/smollm2-135m-instruct [--long 1500] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from ai_platform.runtime import generation
from ai_platform.runtime.kv_batch import new_batch
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.model_runner import ModelRunner
from ai_platform.runtime.scheduler import Scheduler, SequenceRequest


def measure(model: LanguageModel, long: int, rng: np.random.Generator) -> tuple[float, float]:
    """(longest gap between the decoding sequence's tokens, the long prompt's time to first token), seconds."""
    batch = Scheduler(ModelRunner(new_batch(model.decoder)), max_batch=8)
    decoding = SequenceRequest(rng.integers(100, 9000, 60).tolist(), 10_000, (), lambda result, error: None)
    batch.admit(decoding)
    while len(decoding.tokens) < 5:
        batch.step()
    arriving = SequenceRequest(rng.integers(100, 9000, long).tolist(), 5, (), lambda result, error: None)
    batch.admit(arriving)
    started = last = time.perf_counter()
    worst = 0.0
    while not arriving.tokens:
        count = len(decoding.tokens)
        batch.step()
        if len(decoding.tokens) > count:
            now = time.perf_counter()
            worst, last = max(worst, now - last), now
    ttft = time.perf_counter() - started
    return max(worst, time.perf_counter() - last), ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="served model folder")
    parser.add_argument("--long", type=int, default=1500, help="tokens of the arriving prompt")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model = LanguageModel.load(args.model, execution_provider="cpu", intra_op_threads=2)
    rng = np.random.default_rng(0)
    chunked = generation.PREFILL_CHUNK
    results: dict[str, list[tuple[float, float]]] = {"whole prompt in one pass": [], f"chunks of {chunked}": []}
    for _ in range(args.runs):  # alternating
        for name, chunk in zip(results, (args.long, chunked), strict=True):
            generation.PREFILL_CHUNK = chunk
            results[name].append(measure(model, args.long, rng))
    base = statistics.median(gap for gap, _ in results["whole prompt in one pass"])
    print(f"\n{args.long}-token prompt joins one decoding sequence; medians of {args.runs}")
    print("| prefill | longest gap between tokens, s | ÷ one pass | long prompt's TTFT, s |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        gap, ttft = statistics.median(g for g, _ in runs), statistics.median(t for _, t in runs)
        print(f"| {name} | {gap:.2f} | {gap / base:.2f} | {ttft:.2f} |")


if __name__ == "__main__":
    main()
