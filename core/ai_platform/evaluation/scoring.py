"""Which measures an operation gets, and its score: one number (0-100, higher is better) plus details.

The model call decides, so that a third-party operation is scored with no code of its own:

- a :class:`Choose` operation is a classifier: each example's ``expected`` fields (e.g.
  ``{"label": ...}``) are compared with the response's, giving accuracy (the score), macro-F1
  and the expected calibration error of the model's confidence (the response's ``confidence``
  field, or else the chosen option's probability);
- a :class:`Generate` operation is scored by corpus chrF of each expected text field against the
  response's field of the same name (``translate``: ``translated_text``);
- ``summarize`` (by name) is scored by ROUGE-L of ``summary`` against the reference, plus
  sentence-count compliance: the share of the model's own answers (before the operation cuts
  them) with at most ``max_sentences`` sentences.

A failed example counts as wrong (classification) or as an empty answer (texts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ai_platform.evaluation import metrics
from ai_platform.evaluation.runner import ExampleRun
from ai_platform.operations import Choice, Choose, Completion, Generate


@dataclass
class Score:
    metric: str  # what ``value`` is: "accuracy", "chrF", "ROUGE-L"
    value: float | None  # 0-100; None when no example could be scored
    details: dict[str, float | None] = field(default_factory=dict)  # other measures (same scale as named)
    reliability: list[metrics.ReliabilityBin] = field(default_factory=list)
    per_example: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> what was judged


def _kind(operation_name: str, runs: Sequence[ExampleRun]) -> str:
    if operation_name == "summarize":
        return "summary"
    for run in runs:
        if isinstance(run.call, Choose):
            return "classification"
        if isinstance(run.call, Generate):
            return "text"
    return "unknown"


def score(operation_name: str, runs: Sequence[ExampleRun]) -> Score:
    """Score ``runs`` (one operation on one model)."""
    scorable = [run for run in runs if run.example.expected]
    kind = _kind(operation_name, runs)
    if not scorable or kind == "unknown":
        return Score(metric="-", value=None)
    if kind == "classification":
        return _classification(scorable)
    if kind == "summary":
        return _summaries(scorable)
    return _texts(scorable)


def _value(run: ExampleRun) -> tuple[str, str | None]:
    keys = sorted(run.example.expected)
    truth = " | ".join(str(run.example.expected[k]) for k in keys)
    if run.response is None:
        return truth, None
    return truth, " | ".join(str(run.field(k)) for k in keys)


def _confidence(run: ExampleRun) -> float | None:
    confidence = run.field("confidence")
    if isinstance(confidence, float | int) and not isinstance(confidence, bool):
        return float(confidence)
    if run.response is not None and isinstance(run.result, Choice) and run.result.scores:
        return max(run.result.scores.values())
    return None


def _classification(runs: Sequence[ExampleRun]) -> Score:
    truth, predicted, confidences = [], [], []
    per_example: dict[str, dict[str, Any]] = {}
    for run in runs:
        t, p = _value(run)
        c = _confidence(run)
        truth.append(t)
        predicted.append(p)
        confidences.append(c)
        per_example[run.id] = {"expected": t, "predicted": p, "confidence": c, "correct": p == t}
    result = metrics.classification(truth, predicted, confidences)
    ece = result["ece"]
    return Score(
        metric="accuracy",
        value=100 * result["accuracy"],
        details={"macro_f1": 100 * result["macro_f1"], "ece": ece},
        reliability=result["reliability"],
        per_example=per_example,
    )


def _texts(runs: Sequence[ExampleRun]) -> Score:
    hypotheses, references = [], []
    per_example: dict[str, dict[str, Any]] = {}
    for run in runs:
        for key, reference in sorted(run.example.expected.items()):
            if not isinstance(reference, str):
                continue
            answer = run.field(key)
            hypothesis = answer if isinstance(answer, str) else ""
            hypotheses.append(hypothesis)
            references.append(reference)
            per_example.setdefault(run.id, {})[key] = {"chrf": metrics.sentence_chrf(hypothesis, reference)}
    if not references:
        return Score(metric="chrF", value=None)
    return Score(metric="chrF", value=metrics.chrf(hypotheses, references), per_example=per_example)


def _summaries(runs: Sequence[ExampleRun]) -> Score:
    predictions, references, compliant, counted = [], [], [], []
    for run in runs:
        summary = run.field("summary")
        predictions.append(summary if isinstance(summary, str) else "")
        references.append(str(run.example.expected.get("summary", "")))
        wanted = run.example.request.get("max_sentences", 3)
        raw = run.result.text if isinstance(run.result, Completion) else None
        sentences = metrics.count_sentences(raw) if raw is not None else None
        counted.append(sentences)
        compliant.append(sentences is not None and 1 <= sentences <= wanted)
    scores = metrics.rouge_l(predictions, references)
    per_example = {
        run.id: {"rouge_l": 100 * s, "model_sentences": n, "max_sentences": run.example.request.get("max_sentences", 3)}
        for run, s, n in zip(runs, scores, counted, strict=True)
    }
    return Score(
        metric="ROUGE-L",
        value=100 * sum(scores) / len(scores),
        details={"sentence_compliance": 100 * sum(compliant) / len(compliant)},
        per_example=per_example,
    )
