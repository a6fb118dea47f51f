"""Serve the real app over the fake engine in its own process(es): ``python serve_fake.py PORT WORKERS``.

Settings come from the environment. ``FAKE_DELAY`` is every model call's
duration; a request whose text contains ``SLOW`` takes ``FAKE_SLOW`` seconds,
so tests can hold requests in flight while they kill a worker.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import uvicorn

from ai_platform.testing import FakeEngine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for support

from support import SEED_MODELS


class SlowWhenAsked(FakeEngine):
    async def _enter(self, operation: str, call: object) -> None:
        await super()._enter(operation, call)
        if "SLOW" in call.messages[-1].content:  # type: ignore[attr-defined]
            await asyncio.sleep(float(os.environ.get("FAKE_SLOW", "2")))


def app_factory() -> object:
    from ai_platform.app import create_app
    from ai_platform.settings import Settings

    engine = SlowWhenAsked(models=dict(SEED_MODELS), delay=float(os.environ.get("FAKE_DELAY", "0")))
    return create_app(Settings.from_env(env_file=None), engine=engine)


if __name__ == "__main__":
    uvicorn.run(
        "serve_fake:app_factory",
        factory=True,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        workers=int(sys.argv[2]),
        log_config=None,
        timeout_graceful_shutdown=1,
    )
