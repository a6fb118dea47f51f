"""Cost of one decode step by batch size and context length: what continuous batching can gain.

Fills a batch with ``B`` random prompts of ``L`` tokens and times decode steps (one token
per row). ``x batch 1`` is the throughput of B rows over one row at the same context: the
most that B concurrent clients can get over one when decoding dominates.

    .venv/bin/python bench/batch_steps.py models/smollm2-135m-instruct [--batches 1,2,4,8,16] [--contexts 100,500]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from ai_platform.runtime.generation import prefill
from ai_platform.runtime.kv_batch import new_batch
from ai_platform.runtime.model import LanguageModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="served model folder")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--contexts", default="100,500,900")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    model = LanguageModel.load(args.model, execution_provider="cpu", intra_op_threads=2)
    decoder = model.decoder
    # One key and one value tensor per layer, each kv_heads x head_dim per position.
    kv_bytes = len(decoder.past_names) * decoder.kv_heads * decoder.head_dim * np.dtype(decoder.kv_dtype).itemsize
    print(f"KV cache: {kv_bytes / 1024:.0f} KiB per token per row ({np.dtype(decoder.kv_dtype).name})")
    print("| context | batch | step ms | tok/s | x batch 1 |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for context in (int(c) for c in args.contexts.split(",")):
        base = None
        for rows in (int(b) for b in args.batches.split(",")):
            batch = new_batch(decoder)
            for _ in range(rows):
                _, past = prefill(decoder, rng.integers(100, 10_000, context).tolist(), lambda: False)
                batch.join(past)
            times = []
            for _ in range(args.steps + 3):  # the first steps warm up
                started = time.perf_counter()
                batch.step([5] * rows)
                times.append(time.perf_counter() - started)
            step = statistics.median(times[3:])
            rate = rows / step
            base = base or rate
            print(f"| {context} | {rows} | {step * 1000:.1f} | {rate:.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
