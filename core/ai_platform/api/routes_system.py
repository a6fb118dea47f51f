"""System endpoints: ``/health`` (``HEAD`` too)."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import psutil
from litestar import Request, Router, get, head
from litestar.params import FromQuery

from ai_platform.api.auth import API_KEY_HEADER, KeyRing, presented_key
from ai_platform.api.openapi_responses import documented
from ai_platform.api.schemas import (
    AdminHealthResponse,
    HealthResponse,
    ModelAgreement,
    ModelHealth,
    PluginHealth,
    PublicModelHealth,
)
from ai_platform.errors import AuthenticationError
from ai_platform.export.model_folder import read_export_record
from ai_platform.plugins import LoadedPlugins
from ai_platform.timestamps import iso_timestamp

if TYPE_CHECKING:
    from ai_platform.engine_contract import Engine, ModelStatus
    from ai_platform.usage.database import Database

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


def health_route(engine: Engine, plugins: LoadedPlugins, database: Database, keyring: KeyRing) -> Router:
    """``GET /health`` (no key; details with an admin key) and ``HEAD /health`` (load balancers).

    Anyone sees what the seed guide's example shows: status, uptime, memory, CPU, each
    model's name, ``loaded`` and path. Load errors, providers, failed plugins and the
    database's error text are internals (paths, library messages, exception text): only
    a request with an admin key in ``X-API-Key`` gets them. A missing, wrong or client key
    gets the public view, never a 403: monitoring needs no key. ``database`` is the app's usage
    database (its state, for admins); ``keyring`` tells an admin key (``X-API-Key`` or ``Authorization: Bearer``).
    """
    started = time.monotonic()
    process = psutil.Process(os.getpid())
    psutil.cpu_percent(interval=None)  # the first reading is meaningless; prime it

    def is_admin(request: Request[Any, Any, Any]) -> bool:
        key = presented_key(request.headers.get(API_KEY_HEADER), request.headers.get("authorization"))
        if not key:
            return False
        try:
            return keyring.authenticate(key).is_admin
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
        db = await database.status()
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
