"""Application layer: the entry point routes call to execute an operation.

A thin façade over orchestration: routes look operations up and run them
here, so that HTTP concerns never meet model or usage concerns.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from ai_platform.errors import NotFoundError
from ai_platform.operations import Operation
from ai_platform.services.orchestration import OrchestrationService, Outcome
from ai_platform.usage.limit_service import RateLimit


class OperationService:
    def __init__(self, orchestration: OrchestrationService) -> None:
        self._orchestration = orchestration

    def get(self, name: str) -> Operation:  # type: ignore[type-arg]
        try:
            return self._orchestration.operations[name]
        except KeyError:
            available = ", ".join(sorted(self._orchestration.operations)) or "none"
            raise NotFoundError(f"Unknown operation '{name}'. Available operations: {available}.") from None

    async def execute(self, name: str, request: Any, *, key_id: str) -> Outcome:
        """Run operation ``name`` on a validated request for the caller with key id ``key_id``."""
        return await self._orchestration.run(self.get(name), request, key_id=key_id)

    async def open_stream(
        self, name: str, request: Any, *, key_id: str
    ) -> tuple[RateLimit, AsyncGenerator[str | Outcome, None]]:
        """:meth:`execute` for a streaming client (see ``OrchestrationService.open_stream``)."""
        return await self._orchestration.open_stream(self.get(name), request, key_id=key_id)
