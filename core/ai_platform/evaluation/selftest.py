"""Self-tests: one example per operation through the loaded models; does each answer, in its schema?

Used by ``ai-platform selftest`` (its own engine, built from the settings exactly as ``serve``
builds it) and ``GET /health?deep=true`` (the running server's engine). "Pass" means the
operation answered as a 200 would: its example ran through the orchestrator as a request
does (``evaluation/runner.py``: the plugins' hooks, the engine's check, the model, the
response validated against the operation's schema) and, for a :class:`Choose` operation, that
each expected field of the example (``label`` for ``classify``) holds one of the options offered
(the categories). It says nothing of quality: that is ``ai-platform eval``. Generation is capped
at :data:`MAX_OUTPUT_TOKENS` tokens so that a check takes seconds, and nothing is counted in usage.
An operation that ships no examples is ``skipped``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ai_platform.engine_contract import Engine
from ai_platform.evaluation.examples import first_example
from ai_platform.evaluation.runner import Hooks, run_example
from ai_platform.operations import Choose, Operation

MAX_OUTPUT_TOKENS = 16
TIMEOUT_SECONDS = 60.0

Outcome = Literal["pass", "fail", "skipped"]


@dataclass(frozen=True)
class SelfTestResult:
    operation: str
    model: str | None
    result: Outcome
    latency_ms: float | None
    error: str | None = None  # why it failed, or why it was skipped
    example: str | None = None  # the id of the example that ran

    @property
    def passed(self) -> bool:
        return self.result != "fail"


async def check_operation(
    operation: Operation,
    engine: Engine,
    hooks: Hooks | None = None,
    *,
    max_output_tokens: int = MAX_OUTPUT_TOKENS,
    timeout: float = TIMEOUT_SECONDS,
) -> SelfTestResult:
    """Self-test one operation on ``engine``."""
    try:
        model: str | None = engine.model_name(operation.name)
    except KeyError:
        model = None
    try:
        examples = operation.load_examples()
    except Exception as exc:
        return SelfTestResult(operation.name, model, "fail", None, f"its examples cannot be read: {exc}")
    example = first_example(examples)
    if example is None:
        return SelfTestResult(operation.name, model, "skipped", None, "the operation ships no examples")
    name = example.id or "#1"
    try:
        async with asyncio.timeout(timeout):
            run = await run_example(
                operation, example, engine, hooks, example_id=name, max_output_tokens=max_output_tokens
            )
    except TimeoutError:
        return SelfTestResult(operation.name, model, "fail", timeout * 1000, f"no answer within {timeout:g} s", name)
    latency = round(run.latency_s * 1000, 1)
    if run.error is not None:
        return SelfTestResult(operation.name, model, "fail", latency, run.error, name)
    if isinstance(run.call, Choose):
        options = set(run.call.options)
        for key in sorted(example.expected):
            answer = run.field(key)
            if answer not in options:
                problem = f"{key}={answer!r} is not one of the options offered"
                return SelfTestResult(operation.name, model, "fail", latency, problem, name)
    return SelfTestResult(operation.name, model, "pass", latency, None, name)


async def selftest(
    operations: Mapping[str, Operation],
    engine: Engine,
    hooks: Hooks | None = None,
    *,
    max_output_tokens: int = MAX_OUTPUT_TOKENS,
    timeout: float = TIMEOUT_SECONDS,
) -> list[SelfTestResult]:
    """Self-test every operation, one after the other (each latency is its own).

    An operation whose model is not loaded fails with the engine's reason (``engine.status()``).
    """
    statuses = {s.operation: s for s in engine.status()}
    results = []
    for name, operation in operations.items():
        status = statuses.get(name)
        if status is not None and not status.loaded:
            results.append(SelfTestResult(name, status.model, "fail", None, f"model not loaded: {status.error}"))
            continue
        results.append(
            await check_operation(operation, engine, hooks, max_output_tokens=max_output_tokens, timeout=timeout)
        )
    return results
