"""Benchmark worker: optimum's ORTModelForCausalLM.generate (run with the export environment's Python)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import onnxruntime as ort
import torch
from optimum.onnxruntime import ORTModelForCausalLM


def main(new_tokens: int, runs: int, threads: int, folder: str, prompt_file: str) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    started = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(folder, session_options=options, provider="CPUExecutionProvider")
    load_s = time.perf_counter() - started
    ids = torch.tensor([json.loads(Path(prompt_file).read_text())])
    greedy = {"do_sample": False, "pad_token_id": 0}
    results = []
    for run in range(runs + 1):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **greedy)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **greedy)
        t2 = time.perf_counter()
        if run:
            # The second call repeats the prefill; decoding is what it spent beyond the first call.
            results.append({"ttft_ms": 1000 * (t1 - t0), "decode_tok_s": new_tokens / ((t2 - t1) - (t1 - t0))})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_s": load_s, "runs": results, "peak_rss_mb": rss}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
