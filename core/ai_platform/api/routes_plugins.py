"""Introspection: ``GET /operations`` (what can I call?) and ``GET /plugins`` (admin: what is installed?)."""

from __future__ import annotations

from litestar import get
from litestar.handlers import HTTPRouteHandler

from ai_platform.api.auth import admin_only
from ai_platform.api.openapi_responses import documented
from ai_platform.api.schemas import OperationEntry, OperationsResponse, PluginEntry, PluginsResponse
from ai_platform.engine_contract import Engine
from ai_platform.limits.service import LimitService
from ai_platform.plugins import LoadedPlugins, describe


def introspection_routes(plugins: LoadedPlugins, engine: Engine, limits: LimitService) -> list[HTTPRouteHandler]:
    @get(
        "/operations",
        tags=["plugins"],
        summary="Available operations, their limits and schemas.",
        **documented(403, 500, (503, "The usage database (which holds the daily limits) is unreachable.")),
    )
    async def list_operations() -> OperationsResponse:
        daily_limits = {info.operation: info.daily_limit for info in await limits.limits()}
        return OperationsResponse(
            operations=[
                OperationEntry(
                    name=op.name,
                    summary=op.summary,
                    path=f"/operations/{op.name}",
                    plugin=plugins.owner_of(op.name).name,
                    model=engine.model_name(op.name),
                    daily_limit=daily_limits[op.name],
                    max_input_chars=op.limits.max_input_chars,
                    max_output_tokens=op.limits.max_output_tokens,
                    max_input_tokens=op.limits.max_input_tokens,
                    # JSON pointer into the OpenAPI document: the route with both of its schemas.
                    schema=f"/schema/openapi.json#/paths/~1operations~1{op.name}/post",
                )
                for op in plugins.operations.values()
            ]
        )

    @get(
        "/plugins",
        tags=["plugins"],
        summary="Installed plugins and their status (admin key).",
        guards=[admin_only],
        **documented((403, "Not an admin key."), 500),
    )
    async def list_plugins() -> PluginsResponse:
        return PluginsResponse(plugins=[PluginEntry(**entry) for entry in describe(plugins.plugins)])

    return [list_operations, list_plugins]
