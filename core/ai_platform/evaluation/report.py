"""``ai-platform eval``'s table and JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from ai_platform.evaluation.evaluate import Row

HEADER = (
    *("OPERATION", "MODEL", "PRECISION", "N", "ERR", "SCORE", "METRIC"),
    *("DETAILS", "MEAN MS", "P95 MS", "TOK/S", "Δ REF"),
)


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _details(row: Row) -> str:
    if row.error is not None:
        return row.error
    if row.score is None:
        return ""
    parts = []
    for key, value in row.score.details.items():
        if key == "macro_f1":
            parts.append(f"macro-F1 {_number(value)}")
        elif key == "ece":
            parts.append(f"ECE {_number(value, 3)}")
        elif key == "sentence_compliance":
            parts.append(f"sentences ok {_number(value, 0)}%")
        else:
            parts.append(f"{key} {_number(value)}")
    return ", ".join(parts)


def _delta(row: Row) -> str:
    if row.is_reference:
        return "(ref)"
    if row.delta is None:
        return "-"
    return f"{row.delta:+.1f}"


def table(rows: Sequence[Row]) -> str:
    """One line per operation and model folder, then a reliability table per classifier row."""
    lines = [HEADER]
    for row in rows:
        score = row.score
        lines.append(
            (
                row.operation,
                row.model.label,
                row.precision or "-",
                str(len(row.runs)),
                str(row.errors),
                _number(score.value if score else None),
                score.metric if score else "-",
                _details(row),
                _number(row.mean_ms, 0),
                _number(row.p95_ms, 0),
                _number(row.tokens_per_second),
                _delta(row),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    numeric = {3, 4, 5, 8, 9, 10, 11}
    out = [
        "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    for row in rows:
        if row.score is None or not any(b.count for b in row.score.reliability):
            continue
        out.append("")
        out.append(
            f"Reliability of {row.operation} on {row.model.label} (confidence bins; ECE {_number(row.score.details.get('ece'), 3)}):"
        )
        out.append(f"  {'bin':<7}  {'n':>5}  {'mean conf':>9}  {'accuracy':>8}")
        for b in row.score.reliability:
            if b.count:
                out.append(
                    f"  {b.lower:.1f}-{b.upper:.1f}  {b.count:>5}  {_number(b.mean_confidence, 3):>9}  {_number(b.accuracy, 3):>8}"
                )
    return "\n".join(out)


def _response(run: Any) -> Any:
    if run.response is None:
        return None
    body = msgspec.to_builtins(run.response)
    body.pop("meta", None)
    return body


def as_json(rows: Sequence[Row], *, split: str, limit: int | None) -> dict[str, Any]:
    """Everything the table shows, and each example's answer and what was judged of it."""
    reference = next((row.model.label for row in rows if row.is_reference), None)
    results = []
    for row in rows:
        score = row.score
        results.append(
            {
                "operation": row.operation,
                "model": row.model.label,
                "model_path": str(row.model.path),
                "precision": row.precision,
                "is_reference": row.is_reference,
                "examples": len(row.runs),
                "errors": row.errors,
                "error": row.error,
                "metric": score.metric if score else None,
                "score": score.value if score else None,
                "details": score.details if score else {},
                "delta_vs_reference": row.delta,
                "latency_ms": {"mean": row.mean_ms, "p95": row.p95_ms},
                "output_tokens_per_second": row.tokens_per_second,
                "reliability": [b.as_dict() for b in score.reliability] if score else [],
                "runs": [
                    {
                        "id": run.id,
                        "split": run.example.split,
                        "error": run.error,
                        "latency_ms": round(run.latency_s * 1000, 1),
                        "prompt_tokens": run.prompt_tokens,
                        "output_tokens": run.output_tokens,
                        "expected": dict(run.example.expected),
                        "response": _response(run),
                        "judged": score.per_example.get(run.id) if score else None,
                    }
                    for run in row.runs
                ],
            }
        )
    return {"split": split, "limit": limit, "reference": reference, "results": results}
