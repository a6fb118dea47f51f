"""``ai-platform eval``: operations run on their examples, per model folder, through the real runtime.

Each model folder gets an :class:`~ai_platform.runtime.engine.InferenceEngine` of its own, in this
process (``isolation="thread"``: no HTTP, no child process), with the server's runtime settings
(execution provider, batch, queue, prefix cache); one folder is loaded at a time. Examples run one
after another, so each latency is that of a lone request (with the prefix cache warm, as on a
server that has seen the operation's instructions before).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ai_platform.evaluation import metrics
from ai_platform.evaluation.examples import Split, select_examples
from ai_platform.evaluation.runner import ExampleRun, Hooks, run_example
from ai_platform.evaluation.scoring import Score, score
from ai_platform.operations import Generate, Operation

EngineFactory = Callable[[Path, Mapping[str, str]], Any]  # (models_dir, operation -> folder) -> engine
Progress = Callable[[str], None]  # called after each example with "model operation"


@dataclass(frozen=True)
class ModelTarget:
    """A model folder to evaluate: ``label`` as the user wrote it, ``path`` where it is."""

    label: str
    path: Path


def resolve_model(value: str, models_dir: Path) -> ModelTarget:
    """A ``--model`` value: a folder name under ``models_dir``, or a path (anything with a ``/``)."""
    as_path = Path(value).expanduser()
    looks_like_path = os.sep in value or value.startswith(".") or as_path.is_absolute()
    if not looks_like_path and (models_dir / value).is_dir():
        return ModelTarget(value, models_dir / value)
    if as_path.is_dir():
        return ModelTarget(value, as_path)
    raise ValueError(f"model folder {value!r} not found (a path, or a folder name under MODELS_DIR={models_dir})")


@dataclass
class Row:
    """One operation on one model folder."""

    operation: str
    model: ModelTarget
    runs: list[ExampleRun] = field(default_factory=list)
    score: Score | None = None
    error: str | None = None  # the model could not be used at all
    is_reference: bool = False
    delta: float | None = None  # score minus the reference folder's score (points)
    precision: str | None = None  # of the folder's weights (fp32, int8, int4), from its export.json; None: unknown

    @property
    def errors(self) -> int:
        return sum(1 for run in self.runs if not run.ok)

    @property
    def mean_ms(self) -> float | None:
        done = [run.latency_s for run in self.runs if run.ok]
        return 1000 * sum(done) / len(done) if done else None

    @property
    def p95_ms(self) -> float | None:
        done = [run.latency_s for run in self.runs if run.ok]
        return 1000 * metrics.percentile(done, 95) if done else None

    @property
    def tokens_per_second(self) -> float | None:
        """Output tokens per second of model time, over the generated answers (``None`` for ``Choose``)."""
        generated = [run for run in self.runs if run.ok and isinstance(run.call, Generate)]
        seconds = sum(run.model_s for run in generated)
        return sum(run.output_tokens for run in generated) / seconds if generated and seconds > 0 else None


def folder_precision(folder: Path) -> str | None:
    """The precision a model folder's ``export.json`` records, as ``GET /health`` shows it (None: not recorded)."""
    from ai_platform.export.model_folder import read_export_record  # no torch: the server reads it too

    record = read_export_record(folder)
    return record.precision if record is not None else None


def plan(
    operations: Sequence[str],
    models: Sequence[ModelTarget],
    configured: Mapping[str, ModelTarget],
    reference: ModelTarget | None,
) -> list[tuple[ModelTarget, list[str]]]:
    """Which operations run on which folder: every operation on each of ``models`` (or, without
    any, each operation on its configured folder), and every operation on ``reference``."""
    targets: dict[Path, tuple[ModelTarget, list[str]]] = {}

    def add(target: ModelTarget, operation: str) -> None:
        key = target.path.resolve()
        entry = targets.setdefault(key, (target, []))
        if operation not in entry[1]:
            entry[1].append(operation)

    for operation in operations:
        if reference is not None:
            add(reference, operation)
        if models:
            for target in models:
                add(target, operation)
        elif operation in configured:
            add(configured[operation], operation)
    return list(targets.values())


async def evaluate(
    operations: Mapping[str, Operation],
    work: Sequence[tuple[ModelTarget, Sequence[str]]],
    engine_factory: EngineFactory,
    hooks: Hooks | None = None,
    *,
    split: Split = "all",
    limit: int | None = None,
    reference: ModelTarget | None = None,
    progress: Progress | None = None,
) -> list[Row]:
    """Run and score; rows in the order of ``operations``, the reference folder first in each."""
    rows: list[Row] = []
    for target, names in work:
        precision = folder_precision(target.path)
        engine = engine_factory(target.path.parent, {name: target.path.name for name in names})
        await engine.start()
        try:
            statuses = {s.operation: s for s in engine.status()}
            for name in names:
                operation = operations[name]
                row = Row(operation=name, model=target, precision=precision)
                rows.append(row)
                status = statuses.get(name)
                if status is not None and not status.loaded:
                    row.error = f"model not loaded: {status.error}"
                    continue
                for example_id, example in select_examples(operation, split, limit):
                    row.runs.append(
                        await run_example(
                            operation, example, engine, hooks, example_id=example_id, model_name=target.label
                        )
                    )
                    if progress is not None:
                        progress(f"{target.label} {name}")
                if not row.runs:
                    row.error = f"no {split} examples" if split != "all" else "no examples"
        finally:
            await engine.close()
    for row in rows:
        if row.runs:
            row.score = score(row.operation, row.runs)
    ref_path = reference.path.resolve() if reference is not None else None
    for row in rows:
        row.is_reference = ref_path is not None and row.model.path.resolve() == ref_path
    for row in rows:
        if ref_path is None or row.is_reference:
            continue
        base = next((r for r in rows if r.is_reference and r.operation == row.operation), None)
        if (
            base is not None
            and base.score
            and row.score
            and base.score.value is not None
            and row.score.value is not None
        ):
            row.delta = row.score.value - base.score.value
    order = {name: i for i, name in enumerate(operations)}
    rows.sort(key=lambda r: (order.get(r.operation, len(order)), not r.is_reference))
    return rows


def total_examples(
    operations: Mapping[str, Operation],
    work: Sequence[tuple[ModelTarget, Sequence[str]]],
    split: Split,
    limit: int | None,
) -> int:
    """How many examples ``evaluate`` will run (for the progress bar)."""
    return sum(len(select_examples(operations[name], split, limit)) for _, names in work for name in names)
