"""Batch-1 decode speed, time to first token and peak RSS: our runtime vs optimum and llama.cpp.

Every contender runs in its own process (its own environment), in rounds that
alternate between them, so a busy machine slows all alike; the table gives
medians over all measured runs and each one's ratio to our first model.

    .venv/bin/python bench/decode.py --ours models/smollm2-135m-instruct [--ours OTHER_FOLDER] \\
        --optimum /path/to/plain-optimum-folder --optimum-python .cache/export-venv/bin/python \\
        --llama /tmp/llama-portable/bin/python:512 --llama /tmp/llama-native/bin/python:1 \\
        --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Plain prose, repeated and cut to the exact token count (no chat template: every contender
# gets the same ids, whatever its own tokenizer would do with a template).
TEXT = (
    "The quarterly report describes how the company moved its servers into two new data centres, "
    "retrained its support staff, and reduced the time customers wait for an answer from four days "
    "to six hours. It also lists the risks that remain: old contracts, a shortage of engineers, and "
    "the cost of electricity, which rose by a third during the winter. "
)


def prompt_ids(folder: Path, length: int) -> list[int]:
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids: list[int] = []
    while len(ids) < length:
        ids = tokenizer.encode(TEXT * (len(ids) // 40 + 2), add_special_tokens=False).ids
    return ids[:length]


def run(command: list[str]) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "core"))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout).strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", type=Path, action="append", required=True, help="served model folder")
    parser.add_argument("--optimum", type=Path, help="optimum export without num_logits_to_keep")
    parser.add_argument("--optimum-python", default=str(ROOT / ".cache" / "export-venv" / "bin" / "python"))
    parser.add_argument("--llama", action="append", default=[], help="PYTHON:N_BATCH of a llama-cpp-python venv")
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2, help="measured runs per process (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    common = [str(args.new_tokens), str(args.runs), str(args.threads)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(prompt_ids(args.ours[0], args.prompt_tokens), handle)
    prompt = handle.name
    # Each worker takes the common arguments, then its own (model, prompt file, ...).
    contenders: dict[str, list[str]] = {}
    for folder in args.ours:
        contenders[f"ours: {folder.name}"] = [
            sys.executable, str(BENCH / "_worker_runtime.py"), *common, str(folder), prompt
        ]  # fmt: skip
    if args.optimum:
        worker = str(BENCH / "_worker_optimum.py")
        contenders["optimum generate"] = [args.optimum_python, worker, *common, str(args.optimum), prompt]
    for spec in args.llama:
        python, n_batch = spec.rsplit(":", 1)
        name = f"llama.cpp {Path(python).parent.parent.name} n_batch={n_batch}"
        contenders[name] = [python, str(BENCH / "_worker_llamacpp.py"), *common, str(args.gguf), prompt, n_batch]

    samples: dict[str, dict[str, list[float]]] = {name: {} for name in contenders}
    for round_ in range(args.rounds):
        for name, command in contenders.items():
            result = run(command)
            print(f"round {round_ + 1} {name}: {json.dumps(result)}", file=sys.stderr)
            if "error" in result:
                continue
            into = samples[name]
            for measured in result["runs"]:  # type: ignore[union-attr]
                for key, value in measured.items():
                    into.setdefault(key, []).append(value)
            into.setdefault("load_s", []).append(result["load_s"])  # type: ignore[arg-type]
            into.setdefault("peak_rss_mb", []).append(result["peak_rss_mb"])  # type: ignore[arg-type]
    os.unlink(prompt)

    medians = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items() if s}
    base = medians[next(iter(medians))]
    print(f"\n{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, {args.threads} threads, medians")
    print("| contender | decode tok/s | ours ÷ it | TTFT ms | it ÷ ours | load s | peak RSS MB | n |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in medians.items():
        n = len(samples[name]["decode_tok_s"])
        print(
            f"| {name} | {m['decode_tok_s']:.1f} | {base['decode_tok_s'] / m['decode_tok_s']:.2f} "
            f"| {m['ttft_ms']:.0f} | {m['ttft_ms'] / base['ttft_ms']:.2f} | {m['load_s']:.2f} "
            f"| {m['peak_rss_mb']:.0f} | {n} |"
        )
    for name in contenders.keys() - medians.keys():
        print(f"| {name} | failed (see stderr) | | | | | | |")


if __name__ == "__main__":
    main()
