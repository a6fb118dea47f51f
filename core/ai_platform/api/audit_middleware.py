"""Audit middleware: times every request and records it once (audit trail and metrics), whatever its outcome."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import cast

from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send

from ai_platform.api.auth import Principal
from ai_platform.api.errors import status_for
from ai_platform.metrics import PlatformMetrics
from ai_platform.usage import audit


class AuditMiddleware(ASGIMiddleware):
    """Outermost route middleware, so it also sees requests refused by authentication."""

    scopes = ("http",)  # type: ignore[assignment]

    def __init__(self, metrics: PlatformMetrics, trail: audit.AuditTrail) -> None:
        self.metrics = metrics
        self.trail = trail

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await next_app(scope, receive, capture)
        except BaseException as exc:
            status = status_for(exc)  # answered by the app-level exception handler after us
            raise
        finally:
            duration_s = time.perf_counter() - started
            state = scope.get("state", {})
            user = scope.get("user")
            operation = scope["route_handler"].opt.get("operation")
            tokens = state.get("output_tokens", 0)
            self.metrics.observe(
                operation=operation,
                route=scope.get("path_template", ""),
                method=cast(HTTPScope, scope)["method"],
                status=status,
                duration_s=duration_s,
                tokens=tokens,
            )
            self.trail.record(
                audit.AuditEntry(
                    timestamp=datetime.now(UTC),
                    request_id=state.get("request_id"),
                    method=cast(HTTPScope, scope)["method"],
                    path=scope["path"][:256],
                    operation=operation,
                    key_id=user.key_id if isinstance(user, Principal) else None,
                    status=status,
                    duration_ms=round(duration_s * 1000, 2),
                    output_tokens=tokens,
                )
            )
