"""Database lifecycle: Tortoise ORM init/close and schema creation."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tortoise import Tortoise
from tortoise.context import TortoiseContext

MODELS_MODULE = "ai_platform.usage.models"


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite://"):
        return None
    path = url.removeprefix("sqlite://").split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


@asynccontextmanager
async def database(url: str) -> AsyncIterator[TortoiseContext]:
    """Open the database for the app's lifetime and create missing tables.

    A SQLite file is created with mode 600: only the service user reads it.
    """
    sqlite_file = _sqlite_path(url)
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        if not sqlite_file.exists():
            os.close(os.open(sqlite_file, os.O_CREAT | os.O_WRONLY, 0o600))
    # Request handlers run in other tasks than the lifespan: the global fallback
    # lets them see this context (as Tortoise's own framework integrations do).
    ctx = await Tortoise.init(db_url=url, modules={"models": [MODELS_MODULE]}, _enable_global_fallback=True)
    try:
        await Tortoise.generate_schemas(safe=True)
        yield ctx
    finally:
        await Tortoise.close_connections()
