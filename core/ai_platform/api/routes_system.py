"""System endpoints: ``/health``, ``/limits``, ``/limits/usage``."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import psutil
from litestar import get, put
from litestar.handlers import HTTPRouteHandler
from litestar.params import JSONBody

from ai_platform.api.auth import admin_only
from ai_platform.api.schemas import (
    HealthResponse,
    LimitEntry,
    LimitsResponse,
    LimitUpdate,
    ModelHealth,
    PluginHealth,
    UsageEntry,
    UsageResponse,
)
from ai_platform.api.validation import not_one_of
from ai_platform.plugins import LoadedPlugins
from ai_platform.services.orchestration import iso_timestamp
from ai_platform.usage.database import database_status
from ai_platform.usage.limit_service import LimitInfo, LimitService

MB = 1024 * 1024


class DatabaseHealth(msgspec.Struct, kw_only=True):
    available: bool
    error: str | None = None  # why not: the driver's exception type and message
    next_attempt_seconds: float | None = None  # not open yet (the server started without it): next try in


class SystemHealthResponse(HealthResponse, kw_only=True):
    """``HealthResponse`` and the usage database's state (without it, operations and limits answer 503)."""

    database: DatabaseHealth


def _limit_entry(info: LimitInfo) -> LimitEntry:
    return LimitEntry(
        operation=info.operation,
        daily_limit=info.daily_limit,
        max_input_chars=info.max_input_chars,
        max_output_tokens=info.max_output_tokens,
        max_input_tokens=info.max_input_tokens,
    )


def limit_routes(limits: LimitService) -> list[HTTPRouteHandler]:
    @get("/limits", tags=["limits"], summary="Limits of every operation.")
    async def get_limits() -> LimitsResponse:
        return LimitsResponse(limits=[_limit_entry(i) for i in await limits.limits()])

    @put(
        "/limits",
        tags=["limits"],
        summary="Change an operation's daily limit (admin key).",
        guards=[admin_only],
        opt={"body_type": LimitUpdate},
    )
    async def put_limits(data: JSONBody[LimitUpdate]) -> LimitEntry:
        if data.operation not in limits.operations:
            raise not_one_of("operation", limits.operations, data.operation)
        return _limit_entry(await limits.set_daily_limit(data.operation, data.daily_limit))

    @get("/limits/usage", tags=["limits"], summary="Today's usage of every operation.")
    async def get_usage() -> UsageResponse:
        rows = await limits.usage()
        return UsageResponse(
            usage=[
                UsageEntry(
                    operation=r.operation,
                    date=r.date.isoformat(),
                    request_count=r.request_count,
                    total_tokens=r.total_tokens,
                    daily_limit=r.daily_limit,
                    remaining=r.remaining,
                )
                for r in rows
            ],
            generated_at=iso_timestamp(datetime.now(UTC)),
        )

    return [get_limits, put_limits, get_usage]


def health_route(engine: Any, plugins: LoadedPlugins) -> HTTPRouteHandler:
    started = time.monotonic()
    process = psutil.Process(os.getpid())
    psutil.cpu_percent(interval=None)  # the first reading is meaningless; prime it

    @get("/health", tags=["system"], summary="Liveness, resources, models, database and plugin status (no key).")
    async def health() -> SystemHealthResponse:
        memory = psutil.virtual_memory()
        models = [
            ModelHealth(
                name=f"{s.operation} ({s.model})",
                loaded=s.loaded,
                path=s.path,
                provider=s.provider,
                error=s.error,
            )
            for s in engine.status()
        ]
        failed = [PluginHealth(name=p.name, status=p.status, error=p.error) for p in plugins.problems]
        db = await database_status()
        healthy = all(m.loaded for m in models) and not failed and db.available
        return SystemHealthResponse(
            status="healthy" if healthy else "degraded",
            uptime_seconds=round(time.monotonic() - started, 1),
            memory_used_mb=round((memory.total - memory.available) / MB, 1),
            memory_total_mb=round(memory.total / MB, 1),
            cpu_percent=psutil.cpu_percent(interval=None),
            process_rss_mb=round(process.memory_info().rss / MB, 1),
            models=models,
            failed_plugins=failed,
            database=DatabaseHealth(
                available=db.available, error=db.error, next_attempt_seconds=db.next_attempt_seconds
            ),
            timestamp=iso_timestamp(datetime.now(UTC)),
        )

    return health
