"""An operation's examples: choosing a split or a sample, and checking them against the operation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec

from ai_platform.operations import Example, Operation

Split = Literal["all", "dev", "heldout"]
SPLIT_CHOICES: tuple[Split, ...] = ("all", "dev", "heldout")


def example_id(example: Example, index: int) -> str:
    """The name of an example in reports: its ``id``, or its position in the operation's list."""
    return example.id if example.id is not None else f"#{index + 1}"


def select_examples(
    operation: Operation,
    split: Split = "all",
    limit: int | None = None,
) -> list[tuple[str, Example]]:
    """``(id, example)`` of ``split``; with ``limit``, that many spread evenly over the list.

    Spreading keeps a small sample representative (examples are usually grouped by label set
    or language pair, so the first N would all come from one group).
    """
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_CHOICES)}, not {split!r}")
    chosen = [
        (example_id(example, index), example)
        for index, example in enumerate(operation.load_examples())
        if split == "all" or example.split == split
    ]
    if limit is not None and limit < len(chosen):
        if limit < 1:
            return []
        step = len(chosen) / limit
        chosen = [chosen[int(i * step)] for i in range(limit)]
    return chosen


def check_examples(operation: Operation) -> tuple[Example, ...]:
    """The operation's examples, after checking each against the operation's own schemas.

    Every ``request`` must validate against ``request_type``; every ``expected`` key must be a
    field of ``response_type`` (other than ``meta``); ids must be unique. Raises ``ValueError``
    listing every problem. Plugin tests call this (``docs/plugins.md``).
    """
    examples = operation.load_examples()
    response_fields = {f.name for f in msgspec.structs.fields(operation.response_type)} - {"meta"}
    problems: list[str] = []
    seen: set[str] = set()
    for index, example in enumerate(examples):
        name = example_id(example, index)
        if name in seen:
            problems.append(f"{name}: duplicate id")
        seen.add(name)
        try:
            msgspec.convert(dict(example.request), operation.request_type)
        except msgspec.ValidationError as exc:
            problems.append(f"{name}: request does not match {operation.request_type.__name__}: {exc}")
        unknown = sorted(set(example.expected) - response_fields)
        if unknown:
            problems.append(f"{name}: expected names fields the response does not have: {', '.join(unknown)}")
    if problems:
        raise ValueError(f"operation {operation.name!r}: {len(problems)} bad example(s):\n" + "\n".join(problems))
    return examples


def first_example(examples: Sequence[Example]) -> Example | None:
    """The example a self-test runs: the first ``dev`` one (held-out ones stay unseen), else the first."""
    return next((e for e in examples if e.split == "dev"), examples[0] if examples else None)
