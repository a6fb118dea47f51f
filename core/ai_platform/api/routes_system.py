"""System endpoints: ``/health``, ``/limits``, ``/limits/usage``."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import psutil
from litestar import Request, Router, get, head, put
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromQuery, JSONBody

from ai_platform.api.auth import API_KEY_HEADER, KeyRing, admin_only
from ai_platform.api.openapi_responses import documented
from ai_platform.api.schemas import (
    AdminHealthResponse,
    HealthResponse,
    LimitEntry,
    LimitsResponse,
    LimitUpdate,
    ModelAgreement,
    ModelHealth,
    PluginHealth,
    PublicModelHealth,
    UsageEntry,
    UsageResponse,
)
from ai_platform.api.validation import not_one_of
from ai_platform.errors import AuthenticationError
from ai_platform.export.model_folder import read_export_record
from ai_platform.plugins import LoadedPlugins
from ai_platform.services.orchestration import iso_timestamp
from ai_platform.usage.database import database_status
from ai_platform.usage.limit_service import LimitInfo, LimitService

if TYPE_CHECKING:
    from ai_platform.engine_contract import ModelStatus

MB = 1024 * 1024


class DatabaseHealth(msgspec.Struct, kw_only=True):
    available: bool
    error: str | None = None  # why not: the driver's exception type and message
    next_attempt_seconds: float | None = None  # not open yet (the server started without it): next try in


class SelfTestHealth(msgspec.Struct, kw_only=True):
    """One operation's self-test (``ai_platform.evaluation.selftest``)."""

    operation: str
    model: str | None
    result: str  # "pass", "fail" or "skipped" (the operation ships no examples)
    latency_ms: float | None
    error: str | None = None  # why it failed or was skipped
    example: str | None = None  # the example that ran


class SystemHealthResponse(AdminHealthResponse, kw_only=True):
    """What an admin sees: ``AdminHealthResponse`` and the usage database's state (without it, operations and
    limits answer 503)."""

    database: DatabaseHealth


class DeepHealthResponse(SystemHealthResponse, kw_only=True):
    """``?deep=true`` (admin key): also one example per operation through the running engine."""

    selftest: list[SelfTestHealth]


def _model_health(status: ModelStatus) -> ModelHealth:
    """An admin's view of one operation's model, with what its folder's export recorded (a small file, read
    afresh: a folder exported again shows its new numbers)."""
    record = read_export_record(Path(status.path))
    agreement = None
    if record is not None and record.agreement is not None and record.threshold is not None:
        agreement = ModelAgreement(
            top1=record.agreement.top1,
            mean_kl=record.agreement.mean_kl,
            positions=record.agreement.positions,
            passed=bool(record.passed),
            min_top1=record.threshold.min_top1,
            max_mean_kl=record.threshold.max_mean_kl,
        )
    return ModelHealth(
        name=f"{status.operation} ({status.model})",
        loaded=status.loaded,
        path=status.path,
        provider=status.provider,
        error=status.error,
        precision=record.precision if record is not None else None,
        agreement=agreement,
    )


def _limit_entry(info: LimitInfo) -> LimitEntry:
    return LimitEntry(
        operation=info.operation,
        daily_limit=info.daily_limit,
        max_input_chars=info.max_input_chars,
        max_output_tokens=info.max_output_tokens,
        max_input_tokens=info.max_input_tokens,
    )


def limit_routes(limits: LimitService) -> list[HTTPRouteHandler]:
    @get("/limits", tags=["limits"], summary="Limits of every operation.", **documented(403, 500, 503))
    async def get_limits() -> LimitsResponse:
        return LimitsResponse(limits=[_limit_entry(i) for i in await limits.limits()])

    @put(
        "/limits",
        tags=["limits"],
        summary="Change an operation's daily limit (admin key).",
        guards=[admin_only],
        opt={"body_type": LimitUpdate},
        **documented(403, 413, 415, 422, 500, 503),
    )
    async def put_limits(data: JSONBody[LimitUpdate]) -> LimitEntry:
        if data.operation not in limits.operations:
            raise not_one_of("operation", limits.operations, data.operation)
        return _limit_entry(await limits.set_daily_limit(data.operation, data.daily_limit))

    @get("/limits/usage", tags=["limits"], summary="Today's usage of every operation.", **documented(403, 500, 503))
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


def health_route(engine: Any, plugins: LoadedPlugins, keyring: KeyRing | None = None) -> Router:
    """``GET /health`` (no key; details with an admin key) and ``HEAD /health`` (load balancers).

    Anyone sees what the seed guide's example shows: status, uptime, memory, CPU, each
    model's name, ``loaded`` and path. Load errors, providers, failed plugins and the
    database's error text are internals (paths, library messages, exception text): only
    a request with an admin key in ``X-API-Key`` gets them. A missing, wrong or client key
    gets the public view, never a 403: monitoring needs no key. ``keyring`` defaults to the
    app's own (``PlatformPlugin.keyring``).
    """
    started = time.monotonic()
    process = psutil.Process(os.getpid())
    psutil.cpu_percent(interval=None)  # the first reading is meaningless; prime it

    def is_admin(request: Request[Any, Any, Any]) -> bool:
        key = request.headers.get(API_KEY_HEADER)
        if not key:
            return False
        ring = keyring
        if ring is None:
            from ai_platform.app import PlatformPlugin  # the app module imports this one

            ring = request.app.plugins.get(PlatformPlugin).keyring
        try:
            return ring.authenticate(key).is_admin
        except AuthenticationError:
            return False

    @get(
        "/health",
        tags=["system"],
        summary="Liveness, resources and models (no key); with an admin key also errors, plugins and the database.",
        **documented((403, "`deep=true` without an admin key."), (422, "`deep` is not a boolean."), 500),
    )
    async def health(
        request: Request[Any, Any, Any], deep: FromQuery[bool] = False
    ) -> DeepHealthResponse | SystemHealthResponse | HealthResponse:  # richest first: clients try them in turn
        admin = is_admin(request)
        checks = None
        if deep:  # runs the models: admins only (issue 12)
            if not admin:
                raise AuthenticationError("This action requires an admin API key.")
            from ai_platform.evaluation.selftest import selftest

            checks = await selftest(plugins.operations, engine, plugins)
        memory = psutil.virtual_memory()
        statuses = engine.status()
        problems = plugins.problems
        db = await database_status()
        healthy = all(s.loaded for s in statuses) and not problems and db.available
        healthy = healthy and all(c.passed for c in checks or ())
        status = "healthy" if healthy else "degraded"
        uptime = round(time.monotonic() - started, 1)
        used, total = round((memory.total - memory.available) / MB, 1), round(memory.total / MB, 1)
        cpu = psutil.cpu_percent(interval=None)
        timestamp = iso_timestamp(datetime.now(UTC))
        if not admin:
            return HealthResponse(
                status=status, uptime_seconds=uptime, memory_used_mb=used, memory_total_mb=total, cpu_percent=cpu,
                models=[PublicModelHealth(name=f"{s.operation} ({s.model})", loaded=s.loaded, path=s.path) for s in statuses],
                timestamp=timestamp,
            )  # fmt: skip
        response = SystemHealthResponse(
            status=status, uptime_seconds=uptime, memory_used_mb=used, memory_total_mb=total, cpu_percent=cpu,
            process_rss_mb=round(process.memory_info().rss / MB, 1),
            models=[_model_health(s) for s in statuses],
            failed_plugins=[PluginHealth(name=p.name, status=p.status, error=p.error) for p in problems],
            timestamp=timestamp,
            database=DatabaseHealth(
                available=db.available, error=db.error, next_attempt_seconds=db.next_attempt_seconds
            ),
        )  # fmt: skip
        if checks is None:
            return response
        return DeepHealthResponse(
            **msgspec.structs.asdict(response),
            selftest=[
                SelfTestHealth(operation=c.operation, model=c.model, result=c.result, latency_ms=c.latency_ms,
                               error=c.error, example=c.example)
                for c in checks
            ],
        )  # fmt: skip

    @head("/health", tags=["system"], summary="Liveness for load balancers: 200, no body (no key).", **documented())
    async def health_head() -> None:
        return None

    return Router(path="/", route_handlers=[health, health_head])
