"""Benchmark worker: this project's runtime on a model folder (run with the server's Python)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from ai_platform.runtime.kv_batch import new_batch
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.model_runner import ModelRunner
from ai_platform.runtime.scheduler import Scheduler, SequenceRequest


def main(new_tokens: int, runs: int, threads: int, folder: str, prompt_file: str) -> None:
    started = time.perf_counter()
    model = LanguageModel.load(Path(folder), execution_provider="cpu", intra_op_threads=threads)
    load_s = time.perf_counter() - started
    ids = json.loads(Path(prompt_file).read_text())
    results = []
    for run in range(runs + 1):  # the first run warms caches and allocators up
        batch = Scheduler(ModelRunner(new_batch(model.decoder)), max_batch=1)
        request = SequenceRequest(ids, new_tokens + 1, (), lambda result, error: None)
        t0 = time.perf_counter()
        batch.admit(request)
        batch.step()  # nothing decodes yet: this step prefills the prompt and takes the first token
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            batch.step()
        t2 = time.perf_counter()
        if run:
            results.append({"ttft_ms": 1000 * (t1 - t0), "decode_tok_s": new_tokens / (t2 - t1)})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_s": load_s, "runs": results, "peak_rss_mb": rss}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
