"""The OpenAPI pages under ``/schema``, served without internet.

Litestar's pages load their scripts, styles, fonts and icons from public CDNs,
so they stay blank on an air-gapped network. Here ``/schema`` and
``/schema/swagger`` are Swagger UI with its files served by this server from
the ``swagger-ui-py`` package (``/schema/static/...``); ``/schema/openapi.json``
and ``/schema/openapi.yaml`` are the document itself. Redoc, RapiDoc and
Stoplight Elements ship in no Python package, so their pages are not served.
Like every path but ``/health``, all of these need ``X-API-Key``.
"""

from __future__ import annotations

import html
import importlib.util
from pathlib import Path
from typing import Any

from litestar import Request, get
from litestar.openapi.plugins import JsonRenderPlugin, OpenAPIRenderPlugin, YamlRenderPlugin
from litestar.params import FromPath
from litestar.response import File
from litestar.router import Router

from ai_platform.errors import NotFoundError

SCHEMA_PATH = "/schema"
STATIC_PATH = f"{SCHEMA_PATH}/static"


def _swagger_ui_folder() -> Path:
    """swagger-ui-py's copy of Swagger UI's distribution (found without importing the package)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is missing (a dependency of ai-platform)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


# The files the page loads; nothing else in that folder is served.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}


class OfflineSwaggerRenderPlugin(OpenAPIRenderPlugin):
    """Swagger UI, its files served from ``/schema/static``; the document is embedded in the page."""

    def __init__(self) -> None:
        super().__init__(
            path="/swagger",
            favicon=f"<link rel='icon' type='image/png' href='{STATIC_PATH}/favicon-32x32.png'>",
        )
        self.folder = _swagger_ui_folder()

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        # "</" cannot end the script early: in JSON it only occurs inside strings, where "<\/" means the same.
        spec = self.render_json(request, openapi_schema).replace(b"</", b"<\\/")
        title = html.escape(str(openapi_schema["info"]["title"]))
        return b"".join(
            [
                f"""<!DOCTYPE html>
<html>
  <head>
    <title>{title}</title>
    {self.favicon}
    <meta charset="utf-8"/>
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <link href="{STATIC_PATH}/swagger-ui.css" rel="stylesheet">
    <script src="{STATIC_PATH}/swagger-ui-bundle.js"></script>
    {self.style}
  </head>
  <body>
    <div id="swagger-container"></div>
    <script type="text/javascript">
      SwaggerUIBundle({{
        spec: """.encode(),
                spec,
                b""",
        dom_id: "#swagger-container",
        deepLinking: true,
        validatorUrl: null,
        presets: [SwaggerUIBundle.presets.apis],
      });
    </script>
  </body>
</html>
""",
            ]
        )

    def receive_router(self, router: Router) -> None:
        folder = self.folder

        @get("/static/{name:str}", include_in_schema=False, sync_to_thread=False)
        def asset(name: FromPath[str]) -> File:
            if name not in ASSETS:
                raise NotFoundError("No such file.")
            return File(
                path=folder / name,
                content_disposition_type="inline",
                media_type=ASSETS[name],
                headers={"Cache-Control": "max-age=86400"},
            )

        router.register(asset)


def render_plugins() -> list[OpenAPIRenderPlugin]:
    """``OpenAPIConfig.render_plugins``: Swagger UI (also at ``/schema``), then the JSON and YAML documents."""
    return [OfflineSwaggerRenderPlugin(), JsonRenderPlugin(), YamlRenderPlugin()]
