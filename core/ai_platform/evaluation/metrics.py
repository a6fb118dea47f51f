"""The measures, each from a maintained library where one exists (imported only when used).

- accuracy and macro-F1: scikit-learn (``sklearn.metrics``), the reference implementation
  everyone's numbers are compared with.
- expected calibration error and its reliability table: written here. The maintained
  libraries that have it (``torchmetrics``, ``netcal``) need PyTorch, which the server's
  environment never installs; scikit-learn has only ``calibration_curve``, without the bin
  counts that ECE weighs by. It is ten lines, and tested against hand-computed values.
- chrF: sacrebleu, the WMT reference implementation (``CHRF()``: character 6-grams, beta 2),
  which works on characters and so on Chinese or Arabic as on English, with no tokenizer.
- ROUGE-L: Google's ``rouge-score`` (the package that reproduces the original ROUGE-1.5.5), with
  its Porter stemmer. That stemmer is code in ``nltk``: no nltk data file is read or downloaded.
  Its tokenizer keeps ``[a-z0-9]`` only, so it suits English summaries (those shipped here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ai_platform.text import split_sentences

EVAL_EXTRA_HINT = "install the eval extra: pip install 'ai-platform[eval]' (make install does)"
EVAL_MODULES = {"sklearn": "scikit-learn", "sacrebleu": "sacrebleu", "rouge_score": "rouge-score"}


def missing_modules() -> list[str]:
    """The eval extra's distributions that are not installed."""
    import importlib.util

    return [dist for module, dist in EVAL_MODULES.items() if importlib.util.find_spec(module) is None]


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin of a reliability table."""

    lower: float
    upper: float
    count: int
    mean_confidence: float | None  # None for an empty bin
    accuracy: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
) -> tuple[float, list[ReliabilityBin]]:
    """ECE over ``bins`` equal-width confidence bins, and the reliability table behind it.

    ECE = sum over bins of (examples in bin / all examples) x |accuracy in bin - mean confidence
    in bin|: 0 for a perfectly calibrated classifier, up to 1. A confidence of exactly 1 falls in
    the last bin; bin ``i`` holds ``i/bins <= c < (i+1)/bins``.
    """
    if len(confidences) != len(correct):
        raise ValueError("confidences and correct must have the same length")
    if bins < 1:
        raise ValueError("bins must be at least 1")
    members: list[list[int]] = [[] for _ in range(bins)]
    for index, confidence in enumerate(confidences):
        if not 0.0 <= confidence <= 1.0 or math.isnan(confidence):
            raise ValueError(f"confidence {confidence} is not a probability")
        members[min(int(confidence * bins), bins - 1)].append(index)
    total = len(confidences)
    ece = 0.0
    table = []
    for b, indices in enumerate(members):
        if indices:
            mean_confidence = sum(confidences[i] for i in indices) / len(indices)
            accuracy = sum(1 for i in indices if correct[i]) / len(indices)
            ece += len(indices) / total * abs(accuracy - mean_confidence)
            table.append(ReliabilityBin(b / bins, (b + 1) / bins, len(indices), mean_confidence, accuracy))
        else:
            table.append(ReliabilityBin(b / bins, (b + 1) / bins, 0, None, None))
    return ece, table


def classification(
    truth: Sequence[str], predicted: Sequence[str | None], confidences: Sequence[float | None]
) -> dict[str, Any]:
    """Accuracy, macro-F1 (scikit-learn) and ECE with its reliability table.

    A ``None`` prediction (the example failed) counts as wrong. Macro-F1 averages the F1 of each
    label that occurs in ``truth``, so a label the model never sees as true adds no class of its own.
    ECE is over the examples that have a confidence.
    """
    from sklearn.metrics import accuracy_score, f1_score

    if not truth:
        raise ValueError("no examples to score")
    missing = "\x00no answer"
    y_pred = [p if p is not None else missing for p in predicted]
    labels = sorted(set(truth))
    accuracy = float(accuracy_score(list(truth), y_pred))
    macro_f1 = float(f1_score(list(truth), y_pred, labels=labels, average="macro", zero_division=0))
    scored = [(c, t == p) for t, p, c in zip(truth, predicted, confidences, strict=True) if c is not None]
    ece, table = expected_calibration_error([c for c, _ in scored], [ok for _, ok in scored]) if scored else (None, [])
    return {"accuracy": accuracy, "macro_f1": macro_f1, "ece": ece, "reliability": table}


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu, 0-100) of ``hypotheses`` against one reference each."""
    from sacrebleu.metrics.chrf import CHRF

    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


def sentence_chrf(hypothesis: str, reference: str) -> float:
    """chrF of one sentence (sacrebleu, 0-100): for per-example reports."""
    from sacrebleu.metrics.chrf import CHRF

    return float(CHRF().sentence_score(hypothesis, [reference]).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure (rouge-score, with stemming; 0-1) of each prediction against its reference."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return [
        float(scorer.score(reference, prediction)["rougeL"].fmeasure)
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def count_sentences(text: str) -> int:
    """Sentences in ``text`` by the summarize operation's own rule (:func:`ai_platform.split_sentences`)."""
    return len(split_sentences(text))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (numpy's linear interpolation)."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def fit_temperature(scores: Sequence[Sequence[float]], truth: Sequence[int]) -> float:
    """The temperature T that minimises the log-loss of softmax(scores / T) on the true indices.

    Temperature scaling (Guo et al. 2017): one parameter, so it cannot change which label wins,
    only how sure the distribution is. The log-loss is convex in 1/T; a golden-section search over
    log T in [0.01, 100] finds it to within 0.1%.
    """
    if not scores or len(scores) != len(truth):
        raise ValueError("scores and truth must be non-empty and of the same length")

    def loss(log_t: float) -> float:
        t = math.exp(log_t)
        total = 0.0
        for row, answer in zip(scores, truth, strict=True):
            top = max(row)
            log_norm = top / t + math.log(sum(math.exp((s - top) / t) for s in row))
            total += log_norm - row[answer] / t
        return total

    low, high = math.log(0.01), math.log(100.0)
    ratio = (math.sqrt(5) - 1) / 2
    while high - low > 1e-3:
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if loss(a) <= loss(b):
            high = b
        else:
            low = a
    return math.exp((low + high) / 2)
