"""The composition root: ``create_app(settings)`` wires every layer together.

API (``api/``) → orchestration (``services/orchestration.py``) → the engine
(``engine_contract.py``, implemented by ``runtime/``) and the limits. Nothing is
built at import time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins import InitPluginProtocol

from ai_platform import __version__, chat
from ai_platform.api.audit_middleware import AuditMiddleware
from ai_platform.api.auth import API_KEY_HEADER, KeyRing, api_key_middleware
from ai_platform.api.errors import EXCEPTION_HANDLERS
from ai_platform.api.openai_compat import openai_router
from ai_platform.api.openapi_docs import SCHEMA_PATH, render_plugins
from ai_platform.api.openapi_responses import TRANSPORT_ERRORS
from ai_platform.api.routes_metrics import metrics_route
from ai_platform.api.routes_operations import operation_route, unknown_operation_route
from ai_platform.api.routes_plugins import introspection_routes
from ai_platform.api.routes_system import health_route
from ai_platform.api.validation import validate_body
from ai_platform.engine_contract import Engine
from ai_platform.limits.routes import limit_routes, quota_routes
from ai_platform.limits.service import LimitService
from ai_platform.logging_config import logging_config
from ai_platform.metrics import PlatformMetrics
from ai_platform.plugins import LoadedPlugins, load_configured_plugins
from ai_platform.services.orchestration import OrchestrationService
from ai_platform.settings import Settings
from ai_platform.usage.audit import AuditTrail
from ai_platform.usage.database import Database

log = logging.getLogger(__name__)

# Larger than any operation's input (8000 characters as \uXXXX escapes is 48 KB),
# small enough that a client cannot make the server buffer much.
MAX_BODY_BYTES = 256 * 1024


class PlatformPlugin(InitPluginProtocol):
    """Configures routes, security, errors, lifespan and OpenAPI on the Litestar app."""

    def __init__(self, settings: Settings, plugins: LoadedPlugins, engine: Engine) -> None:
        self.settings = settings
        self.plugins = plugins
        self.engine = engine
        # The usage database: opened in the lifespan, shared by the limits, the audit trail and /health.
        self.database = Database(settings.database_url)
        self.limits = LimitService(
            self.database,
            plugins.operations,
            default_daily_limit=settings.default_daily_limit,
            timezone=settings.limit_zone,
            # A request runs at most its timeout; the margin covers clock skew between servers.
            lease_seconds=settings.request_timeout_seconds + 60,
        )
        self.metrics = PlatformMetrics(engine, plugins.operations)
        self.audit = AuditTrail(self.database, retention_days=settings.audit_retention_days)
        self.keyring = KeyRing(settings.valid_api_keys, settings.admin_api_keys, settings.secret_key)
        self.service = OrchestrationService(
            plugins.operations,
            engine,
            self.limits,
            timeout_seconds=settings.request_timeout_seconds,
            hooks=plugins,
        )

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        self._configure_routes(app_config)
        self._configure_security(app_config)
        self._configure_errors(app_config)
        self._configure_lifespan(app_config)
        self._configure_openapi(app_config)
        return app_config

    def _configure_routes(self, app_config: AppConfig) -> None:
        app_config.route_handlers.extend(operation_route(op, self.service) for op in self.plugins.operations.values())
        app_config.route_handlers.append(unknown_operation_route(self.service))
        app_config.route_handlers.extend(limit_routes(self.limits))
        app_config.route_handlers.extend(quota_routes(self.limits, self.keyring))
        app_config.route_handlers.append(health_route(self.engine, self.plugins, self.database, self.keyring))
        app_config.route_handlers.extend(introspection_routes(self.plugins, self.engine, self.limits))
        app_config.route_handlers.append(metrics_route(self.metrics, self.settings.metrics_access))
        if self.settings.openai_api and chat.NAME in self.plugins.operations:
            app_config.route_handlers.append(openai_router(self.service, self.engine))

    def _configure_security(self, app_config: AppConfig) -> None:
        # The audit middleware wraps the whole app instead (audited(), called by create_app): route
        # middleware never sees requests that no route matches.
        app_config.middleware.append(api_key_middleware(self.keyring))

    def audited(self, app: Litestar) -> Litestar:
        """``app`` with every HTTP request audited and counted, 404s and 405s from the router included."""
        app.asgi_handler = AuditMiddleware(app.asgi_handler, self.metrics, self.audit, self.keyring)
        return app

    def _configure_errors(self, app_config: AppConfig) -> None:
        app_config.exception_handlers.update(EXCEPTION_HANDLERS)
        app_config.before_request = validate_body

    def _configure_lifespan(self, app_config: AppConfig) -> None:
        @asynccontextmanager
        async def lifespan(_: Litestar) -> AsyncIterator[None]:
            # The server starts even when the database is down: it keeps trying in the background,
            # operations answer 503 meanwhile and /health says why (usage/database.py).
            async with self.database.open_in_background(on_open=self.limits.recover):
                try:
                    await self.engine.start()
                    log.info("%s serving operations: %s", self.settings.app_name, ", ".join(self.plugins.operations))
                    yield
                finally:
                    try:
                        await self.engine.close()
                    finally:
                        if self.database.is_open():
                            await self.audit.flush(timeout=10)  # the rows still queued, while the database is open

        app_config.lifespan.append(lifespan)

    def _configure_openapi(self, app_config: AppConfig) -> None:
        app_config.openapi_config = OpenAPIConfig(
            title=self.settings.app_name,
            version=__version__,
            description="Task operations over local language models. Every endpoint but /health needs an API key, "
            "in X-API-Key or as Authorization: Bearer. " + TRANSPORT_ERRORS,
            components=Components(
                security_schemes={
                    "ApiKey": SecurityScheme(type="apiKey", name=API_KEY_HEADER, security_scheme_in="header"),
                    "Bearer": SecurityScheme(type="http", scheme="bearer"),
                }
            ),
            security=[{"ApiKey": []}, {"Bearer": []}],
            path=SCHEMA_PATH,
            render_plugins=render_plugins(),  # Swagger UI with its files served here: no CDN (air-gapped)
        )


def create_app(
    settings: Settings,
    *,
    plugins: LoadedPlugins | None = None,
    engine: Engine | None = None,
    debug: bool = False,
) -> Litestar:
    """Build the app. Tests pass their own ``plugins`` and a fake ``engine``."""
    logs = logging_config(
        settings.log_level, settings.log_dir, max_bytes=settings.log_max_bytes, backup_count=settings.log_backup_count
    )
    # Litestar applies it only once the app exists: plugin load errors and the model map's notes come before,
    # and must reach the log too (in a worker process nothing has configured logging yet).
    logs.configure()
    if plugins is None:
        plugins = load_configured_plugins(settings)
    models = plugins.assign_models(settings)
    if engine is None:
        from ai_platform.engine_router import build_engine  # the runtime loads only when some model is local

        engine = build_engine(settings, models)
    platform = PlatformPlugin(settings, plugins, engine)
    app = Litestar(
        plugins=[platform],
        logging_config=logs,
        request_max_body_size=MAX_BODY_BYTES,
        debug=debug,
    )
    return platform.audited(app)
