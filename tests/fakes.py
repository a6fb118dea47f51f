"""A fake inference engine for fast tests of the HTTP, plugin and usage layers.

Its outputs are derived from the prompt (so tests can check that the right
prompt reached the model) and it can be told to fail or wait. The real
runtime is exercised by the runtime and end-to-end tests.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from ai_platform.errors import ModelUnavailableError
from ai_platform.operations import Choice, Choose, Completion, Generate
from ai_platform.runtime.engine import ModelStatus


@dataclass
class FakeEngine:
    models: dict[str, str] = field(default_factory=dict)
    unavailable: set[str] = field(default_factory=set)
    delay: float = 0.0
    fail_with: BaseException | None = None
    calls: list[tuple[str, object]] = field(default_factory=list)
    started: bool = False
    cancelled: int = 0

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    def status(self) -> list[ModelStatus]:
        return [
            ModelStatus(
                operation=op,
                model=model,
                path=f"/models/{model}",
                loaded=op not in self.unavailable,
                provider=None if op in self.unavailable else "CPUExecutionProvider",
                error="missing" if op in self.unavailable else None,
            )
            for op, model in self.models.items()
        ]

    def model_name(self, operation: str) -> str:
        return self.models.get(operation, f"fake-{operation}")

    async def _enter(self, operation: str, call: object) -> None:
        if operation in self.unavailable:
            raise ModelUnavailableError(f"Model for operation '{operation}' is not loaded: missing")
        self.calls.append((operation, call))
        if self.delay:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.fail_with is not None:
            raise self.fail_with

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion:
        await self._enter(operation, call)
        words = call.messages[-1].content.split()
        produced = words[:max_output_tokens]
        text = " ".join(produced) + ". Second sentence. Third sentence."
        return Completion(text=text, output_tokens=len(produced), finish_reason="length")

    async def choose(self, operation: str, call: Choose) -> Choice:
        await self._enter(operation, call)
        text = call.messages[-1].content.lower()
        logits = [float(text.count(option.lower())) for option in call.options]
        total = sum(math.exp(x) for x in logits)
        scores = {o: math.exp(x) / total for o, x in zip(call.options, logits, strict=True)}
        return Choice(scores=scores, output_tokens=2)
