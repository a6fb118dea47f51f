"""``bench/overhead.py``'s server: the real app with an engine that answers instantly.

python bench/_instant_server.py LOOP HTTP PORT     (settings from the environment)
"""

from __future__ import annotations

import sys

import uvicorn

from ai_platform.app import create_app
from ai_platform.operations import Choice, Choose, Completion, Generate
from ai_platform.runtime.engine import ModelStatus
from ai_platform.settings import Settings


class InstantEngine:
    """An engine whose model calls cost nothing, so only the platform's own time remains."""

    def __init__(self, operations: dict[str, str]) -> None:
        self._operations = operations

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def status(self) -> list[ModelStatus]:
        return [ModelStatus(op, model, model, True, "stub", None) for op, model in self._operations.items()]

    def model_name(self, operation: str) -> str:
        return self._operations[operation]

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion:
        return Completion(text="The meeting moved to Thursday.", output_tokens=7, finish_reason="stop")

    async def choose(self, operation: str, call: Choose) -> Choice:
        return Choice(scores={option: 1 / len(call.options) for option in call.options}, output_tokens=1)


if __name__ == "__main__":
    loop, http_impl, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = Settings.from_env(env_file=None)
    app = create_app(settings, engine=InstantEngine(dict(settings.operation_model_map)))
    uvicorn.run(app, port=port, loop=loop, http=http_impl, log_level="warning")
