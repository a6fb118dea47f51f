"""``bench/overhead.py``'s server: the real app with an engine that answers instantly.

python bench/_instant_server.py LOOP HTTP PORT     (settings from the environment)
"""

from __future__ import annotations

import sys

import uvicorn

from ai_platform.app import create_app
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine

ANSWER = "The meeting moved to Thursday."


def instant_engine(models: dict[str, str]) -> FakeEngine:
    """The plugin kit's fake runtime with a fixed answer: model calls cost nothing, only the platform's time remains."""
    return FakeEngine(models=models, answer=ANSWER)


if __name__ == "__main__":
    loop, http_impl, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = Settings.from_env(env_file=None)
    app = create_app(settings, engine=instant_engine(dict(settings.operation_model_map)))
    uvicorn.run(app, port=port, loop=loop, http=http_impl, log_level="warning")
