"""Benchmark worker: llama.cpp through llama-cpp-python on the GGUF file (run with that venv's Python).

``n_batch`` is an extra argument: the native build on this host's CPU crashes on
multi-token batches, so it prefills one token at a time (n_batch=1).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from llama_cpp import Llama


def main(new_tokens: int, runs: int, threads: int, gguf: str, prompt_file: str, n_batch: int) -> None:
    started = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=threads, n_batch=n_batch, verbose=False)
    load_s = time.perf_counter() - started
    ids = json.loads(Path(prompt_file).read_text())
    results = []
    for run in range(runs + 1):
        # Without reset() the generator would reuse the previous run's KV cache for the shared prefix.
        llm.reset()
        generator = llm.generate(ids, temp=0.0, top_k=1, reset=True)
        t0 = time.perf_counter()
        next(generator)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            next(generator)
        t2 = time.perf_counter()
        if run:
            results.append({"ttft_ms": 1000 * (t1 - t0), "decode_tok_s": new_tokens / (t2 - t1)})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_s": load_s, "runs": results, "peak_rss_mb": rss}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]))
