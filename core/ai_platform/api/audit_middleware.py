"""Audit middleware: times every request and records it once (audit trail and metrics), whatever its outcome.

It wraps the whole application, outside Litestar's router and exception handling
(``create_app`` installs it), so it also sees what no route handler ever does: a path
no route matches (404), a method the route does not have (405), a request refused by
authentication (403). Each is audited with its final status.

A stream (``ai_platform.api.streaming``) answers 200 before its outcome is known; it records
how it ended in the request's state (``stream_status``: 200 for a delivered result, its
``error`` event's status, 499 for a stream its client abandoned), which is audited instead.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from ai_platform.api.auth import API_KEY_HEADER, KeyRing, Principal, presented_key
from ai_platform.api.errors import status_for
from ai_platform.api.streaming import STREAM_STATUS
from ai_platform.errors import AuthenticationError
from ai_platform.metrics import PlatformMetrics
from ai_platform.usage import audit

# Metrics label values: a method outside this set (the client chooses it) is counted as OTHER.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_KEY_HEADER = API_KEY_HEADER.lower().encode()
_AUTHORIZATION = b"authorization"


class AuditMiddleware:
    """The outermost ASGI layer: audits and counts every HTTP request, routed or not."""

    def __init__(self, app: ASGIApp, metrics: PlatformMetrics, trail: audit.AuditTrail, keyring: KeyRing) -> None:
        self.app = app
        self.metrics = metrics
        self.trail = trail
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except BaseException as exc:
            if status is None:  # nothing answered (else the client got that status, whatever broke after)
                status = status_for(exc)
            raise
        finally:
            self._record(scope, 500 if status is None else status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, duration_s: float) -> None:
        state: dict[str, Any] = scope.get("state", {})
        if status == 200:  # a stream's response started as 200: how it ended is what counts
            status = state.get(STREAM_STATUS, status)
        handler = scope.get("route_handler")  # none when no route matched
        operation = handler.opt.get("operation") if handler is not None else None
        tokens = state.get("output_tokens", 0)
        method: str = scope["method"]  # type: ignore[typeddict-item]
        self.metrics.observe(
            operation=operation,
            route=scope.get("path_template", ""),  # never the path itself: clients choose it
            method=method if method in KNOWN_METHODS else "OTHER",
            status=status,
            duration_s=duration_s,
            tokens=tokens,
        )
        self.trail.record(  # which escapes and caps the path, method and request id
            audit.AuditEntry(
                timestamp=datetime.now(UTC),
                request_id=state.get("request_id"),
                method=method,
                path=scope["path"],
                operation=operation,
                key_id=self._key_id(scope),
                status=status,
                duration_ms=round(duration_s * 1000, 2),
                output_tokens=tokens,
            )
        )

    def _key_id(self, scope: Scope) -> str | None:
        """The caller's key id: from authentication, or, where it did not run (/health, no route), its valid key's."""
        user = scope.get("user")
        if isinstance(user, Principal):
            return user.key_id
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in (_KEY_HEADER, _AUTHORIZATION):
                headers.setdefault(name, value.decode("latin-1"))
        key = presented_key(headers.get(_KEY_HEADER), headers.get(_AUTHORIZATION))
        if key is None:
            return None
        try:
            return self.keyring.authenticate(key).key_id
        except AuthenticationError:
            return None
