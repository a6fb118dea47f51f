"""How long a short generation waits behind a long classify: the classify run whole vs in slices.

A classify of a ``--long``-token text (the red-team's 2,000 emoji were ~6,000 tokens) starts,
then a one-sentence summarize-sized generation arrives. With the classify run as one job
(as before), the generation waits for its whole prefill; with the classify in slices of one
forward pass, taking turns with the batch's decode steps, it waits a chunk at a time.
Prints the short generation's latency and the classify's, medians of ``--runs``, alternating.

    .venv/bin/python bench/fair_share.py models/smollm2-135m-instruct [--long 6000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from ai_platform.operations import Message
from ai_platform.runtime.engine_loop import EngineLoop
from ai_platform.runtime.kv_batch import new_batch
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.model_runner import ModelRunner
from ai_platform.runtime.scheduler import Scheduler

LABELS = ["billing", "technical support", "sales", "general inquiry"]


async def measure(
    model: LanguageModel, prompt: list[int], answers: list[list[int]], sliced: bool
) -> tuple[float, float]:
    worker = EngineLoop("bench", 8, Scheduler(ModelRunner(new_batch(model.decoder)), 8))
    short = model.encode_prompt([Message("user", "Summarize in one sentence: the council approved the budget.")])
    job = (
        model.choose_steps(prompt, answers, LABELS)
        if sliced
        else (lambda stop: model.choose(prompt, answers, LABELS, stop))
    )
    started = time.perf_counter()
    classify = asyncio.ensure_future(worker.run(job))
    await asyncio.sleep(0.1)
    arrived = time.perf_counter()
    await worker.generate(short, 24, model.eos_ids)
    short_latency = time.perf_counter() - arrived
    await classify
    classify_latency = time.perf_counter() - started
    await worker.close()
    return short_latency, classify_latency


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="served model folder")
    parser.add_argument("--long", type=int, default=6000, help="tokens of the classify's text")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model = LanguageModel.load(args.model, execution_provider="cpu", intra_op_threads=None, prefix_cache_bytes=0)
    text = ""
    while len(model.tokenizer.encode(text)) < args.long:
        text += "The router keeps dropping the connection and the light turns red again. "
    prompt, answers = model.encode_choice([Message("user", f"Classify: {text}")], LABELS)
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.runs):
        for sliced in (False, True):
            results[sliced].append(await measure(model, prompt, answers, sliced))
    print(f"\n{len(prompt)}-token classify, then a short generation (24 tokens); medians of {args.runs}")
    print("| classify runs | short generation, s | classify, s |")
    print("|---|---|---|")
    for sliced, name in ((False, "whole, alone"), (True, "in slices, in turn")):
        short = statistics.median(s for s, _ in results[sliced])
        whole = statistics.median(c for _, c in results[sliced])
        print(f"| {name} | {short:.2f} | {whole:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
