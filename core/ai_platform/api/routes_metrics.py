"""``GET /metrics``: Prometheus exposition, for admin keys or for loopback clients (``METRICS_ACCESS``)."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Literal

from litestar import Response, get
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler, HTTPRouteHandler

from ai_platform.api.auth import admin_only
from ai_platform.api.openapi_responses import documented
from ai_platform.errors import AuthenticationError
from ai_platform.metrics import CONTENT_TYPE, PlatformMetrics

MetricsAccess = Literal["admin", "loopback"]


def loopback_only(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Guard: the client (after the trusted proxy's ``X-Forwarded-For``) must be on this host."""
    client = connection.client
    try:
        local = client is not None and ip_address(client.host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise AuthenticationError("Metrics are only served to clients on this host.")


def metrics_route(metrics: PlatformMetrics, access: MetricsAccess) -> HTTPRouteHandler:
    """``admin``: an admin API key is required. ``loopback``: no key, but only local clients."""

    @get(
        "/metrics",
        tags=["system"],
        summary="Prometheus metrics (admin key, or local clients when METRICS_ACCESS=loopback).",
        guards=[admin_only] if access == "admin" else [loopback_only],
        opt={"exclude_from_auth": access == "loopback"},
        media_type=CONTENT_TYPE,
        include_in_schema=access == "admin",
        **documented((403, "Not an admin key."), 500),
    )
    async def get_metrics() -> Response[bytes]:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return get_metrics
