"""How to turn a model into a classifier: label-scoring variants side by side (issue 12, item 6).

Runs every ``Choose`` operation that ships examples (``classify``, and ``sentiment`` when its
example plugin is installed) on one model folder, one example at a time, and scores each
example's labels once per token (:func:`option_log_probs_steps`, what the runtime's ``Choose``
does). From those numbers, for the same examples and model:

- ``sum``: log P(label tokens + end-of-turn | prompt), the sum over tokens (the runtime until issue 12);
- ``mean``: the same divided by its token count (length-normalised);
- ``sum-eot``: the sum without the end-of-turn token (P of a prefix: a label may go on);
- ``first``: the first token only;
- ``*+cc``: contextual calibration (Zhao et al. 2021): minus the same label's score for the same
  prompt with the text replaced by ``N/A`` (a second scoring pass per request);
- ``generate``: greedy answer (16 tokens) mapped to a label (see :func:`map_answer`); no
  probabilities, so no ECE;
- ``+T``: the label distribution at one temperature, fitted on dev by log-loss
  (:func:`ai_platform.evaluation.metrics.fit_temperature`); accuracy is unchanged, only calibration moves.

Accuracy, macro-F1 and ECE as ``ai-platform eval`` computes them (all examples, dev, heldout), and
the median time of the model work per request.

    .venv/bin/python bench/classify_scoring.py models/smollm2-135m-instruct [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from ai_platform.evaluation.metrics import classification, fit_temperature
from ai_platform.operations import Choose, Operation
from ai_platform.runtime.generation import option_log_probs_steps, run_steps
from ai_platform.runtime.model import LanguageModel, option_probabilities

# The unbatched greedy decoder the runtime's tests check against (test-only code, not the server's).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from runtime_reference import greedy_generate

CONTENT_FREE = "N/A"
GENERATE_TOKENS = 16


def _operations() -> list[Operation]:
    from ai_platform_classify import OPERATION

    operations = [OPERATION]
    try:
        from ai_platform_sentiment import build_operation
    except ImportError:
        return operations
    return [*operations, build_operation()]


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def map_answer(answer: str, labels: Sequence[str]) -> str | None:
    """The label a free answer names: the same words (case, punctuation and ``_`` aside), else the
    longest label whose words occur in the answer, else the label the answer's words start; None if none."""
    said = _normalise(answer)
    names = {label: _normalise(label) for label in labels}
    for label, name in names.items():
        if said == name:
            return label
    inside = [label for label, name in names.items() if name and re.search(rf"\b{re.escape(name)}\b", said)]
    if inside:
        return max(inside, key=lambda label: len(names[label]))
    starts = [label for label, name in names.items() if said and name.startswith(said)]
    return starts[0] if len(starts) == 1 else None


@dataclass
class Record:
    operation: str
    id: str
    split: str
    labels: list[str]
    truth: str
    per_token: list[list[float]]  # each label's token log-probs, the end-of-turn token last
    content_free: list[list[float]]
    answer: str
    score_s: float
    content_free_s: float
    generate_s: float


def collect(model: LanguageModel, progress: Callable[[str], None]) -> list[Record]:
    records = []
    for operation in _operations():
        for index, example in enumerate(operation.load_examples()):
            request = msgspec.convert(dict(example.request), operation.request_type)
            call = operation.prompt(request)
            assert isinstance(call, Choose)
            labels = list(call.options)
            (truth,) = example.expected.values()
            free_request = msgspec.convert({**example.request, "text": CONTENT_FREE}, operation.request_type)
            free_call = operation.prompt(free_request)
            assert isinstance(free_call, Choose)

            start = time.perf_counter()
            prompt, answers = model.encode_choice(call.messages, labels)
            per_token = run_steps(option_log_probs_steps(model.decoder, prompt, answers), lambda: False)
            score_s = time.perf_counter() - start
            start = time.perf_counter()
            free_prompt, free_answers = model.encode_choice(free_call.messages, labels)
            content_free = run_steps(option_log_probs_steps(model.decoder, free_prompt, free_answers), lambda: False)
            content_free_s = time.perf_counter() - start
            start = time.perf_counter()
            generated = greedy_generate(
                model.decoder,
                model.encode_prompt(call.messages),
                max_new_tokens=GENERATE_TOKENS,
                eos_ids=model.eos_ids,
            )
            answer = model.completion(generated).text
            generate_s = time.perf_counter() - start
            ident = example.id or f"{operation.name}-{index}"
            records.append(
                Record(
                    operation.name,
                    ident,
                    example.split,
                    labels,
                    str(truth),
                    per_token,
                    content_free,
                    answer,
                    score_s,
                    content_free_s,
                    generate_s,
                )
            )
            progress(f"{operation.name} {ident}: {answer!r}")
    return records


SCORES: dict[str, Callable[[list[float]], float]] = {
    "sum": lambda lp: sum(lp),
    "mean": lambda lp: sum(lp) / len(lp),
    "sum-eot": lambda lp: sum(lp[:-1]) if len(lp) > 1 else lp[0],
    "first": lambda lp: lp[0],
}


def label_scores(record: Record, variant: str) -> list[float]:
    """Each label's score (a log-probability up to a constant) under ``variant``."""
    base, _, calibrated = variant.partition("+")
    scores = [SCORES[base](lp) for lp in record.per_token]
    if calibrated == "cc":
        scores = [s - SCORES[base](lp) for s, lp in zip(scores, record.content_free, strict=True)]
    return scores


@dataclass
class Row:
    variant: str
    temperature: float | None
    metrics: dict[str, dict[str, Any]]  # per split ("all", "dev", "heldout")
    median_ms: float


def evaluate(records: list[Record], variant: str, temperature: float | None) -> dict[str, Any]:
    truth: list[str] = []
    predicted: list[str | None] = []
    confidences: list[float | None] = []
    unmapped = 0
    for record in records:
        truth.append(record.truth)
        if variant == "generate":
            label = map_answer(record.answer, record.labels)
            unmapped += label is None
            predicted.append(label)
            confidences.append(None)
            continue
        probs = option_probabilities([score / (temperature or 1.0) for score in label_scores(record, variant)])
        best = max(range(len(probs)), key=probs.__getitem__)
        predicted.append(record.labels[best])
        confidences.append(probs[best])
    result = classification(truth, predicted, confidences)
    result["unmapped"] = unmapped
    result["n"] = len(records)
    return result


def rows_for(records: list[Record], variants: Sequence[str]) -> list[Row]:
    dev = [r for r in records if r.split == "dev"]
    rows = []
    for variant in variants:
        temperatures: list[float | None] = [None]
        if variant != "generate":
            dev_scores = [label_scores(r, variant) for r in dev]
            dev_truth = [r.labels.index(r.truth) for r in dev]
            temperatures.append(fit_temperature(dev_scores, dev_truth))
        for temperature in temperatures:
            metrics = {
                split: evaluate([r for r in records if split in ("all", r.split)], variant, temperature)
                for split in ("all", "dev", "heldout")
            }
            if variant == "generate":
                ms = statistics.median(r.generate_s for r in records) * 1000
            elif variant.endswith("+cc"):
                ms = statistics.median(r.score_s + r.content_free_s for r in records) * 1000
            else:
                ms = statistics.median(r.score_s for r in records) * 1000
            rows.append(Row(variant, temperature, metrics, ms))
    return rows


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(rows: list[Row]) -> str:
    splits = ("all", "dev", "heldout")
    head = "| variant | T | " + " | ".join(f"acc {s} | F1 {s} | ECE {s}" for s in splits) + " | unmapped | median ms |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        name = row.variant + ("+T" if row.temperature is not None else "")
        cells = [name, _fmt(row.temperature, digits=2)]
        for split in splits:
            m = row.metrics[split]
            cells += [_fmt(m["accuracy"], 100), _fmt(m["macro_f1"], 100), _fmt(m["ece"], digits=3)]
        cells += [str(row.metrics["all"]["unmapped"] or ""), f"{row.median_ms:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def served_latency(folder: Path, threads: int, calibrated: bool) -> list[float]:
    """Seconds per example through ``LanguageModel.choose`` as the server runs it: a freshly loaded
    model whose prefix cache and kept neutral scores fill up as the examples go by."""
    model = LanguageModel.load(folder, execution_provider="cpu", intra_op_threads=threads)
    seconds = []
    for operation in _operations():
        for example in operation.load_examples():
            call = operation.prompt(msgspec.convert(dict(example.request), operation.request_type))
            assert isinstance(call, Choose)
            neutral = (
                call.neutral
                or operation.prompt(
                    msgspec.convert({**example.request, "text": CONTENT_FREE}, operation.request_type)
                ).messages
            )
            start = time.perf_counter()
            prompt, answers = model.encode_choice(call.messages, call.options)
            baseline = model.encode_choice(neutral, call.options) if calibrated else None
            model.choose(prompt, answers, call.options, lambda: False, baseline)
            seconds.append(time.perf_counter() - start)
    return seconds


VARIANTS = ("sum", "mean", "sum-eot", "first", "sum+cc", "mean+cc", "sum-eot+cc", "first+cc", "generate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every example's raw scores here")
    parser.add_argument("--load", type=Path, help="tabulate the raw scores of an earlier --json instead of running")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the as-served timing (0: none)")
    args = parser.parse_args()
    if args.load:
        records = [Record(**r) for r in json.loads(args.load.read_text())]
    else:
        model = LanguageModel.load(args.model, execution_provider="cpu", intra_op_threads=args.threads)
        records = collect(model, lambda line: print(line, flush=True))
        if args.json:
            args.json.write_text(json.dumps([r.__dict__ for r in records]))
    for operation in sorted({r.operation for r in records}, key=lambda name: name != "classify"):
        subset = [r for r in records if r.operation == operation]
        counts = {split: sum(r.split == split for r in subset) for split in ("dev", "heldout")}
        print(
            f"\n{operation} on {args.model.name}: {len(subset)} examples ({counts['dev']} dev, {counts['heldout']} heldout)"
        )
        print(table(rows_for(subset, VARIANTS)))
    if any(math.isnan(x) for r in records for lp in r.per_token for x in lp):
        raise SystemExit("NaN in the scores")
    timings: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for calibrated in (False, True):
            timings[calibrated] += served_latency(args.model, args.threads, calibrated)
    for calibrated, seconds in timings.items():
        if seconds:
            ms = sorted(s * 1000 for s in seconds)
            print(
                f"as served, {'calibrated (neutral scores kept)' if calibrated else 'plain'}: {len(ms)} requests,"
                f" median {statistics.median(ms):.0f} ms, mean {statistics.fmean(ms):.0f} ms,"
                f" p95 {ms[int(0.95 * (len(ms) - 1))]:.0f} ms"
            )


if __name__ == "__main__":
    main()
