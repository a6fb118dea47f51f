"""Hook specifications: the contract between the core and plugins.

Plugins implement hooks with ``from ai_platform import hookimpl``. The
compatibility promise: hooks only ever gain arguments, and an implementation
may accept any subset of a hook's arguments (pluggy's rule), so a plugin
written for plugin API 1 keeps working as long as the core supports API 1.
A plugin module may declare ``PLUGIN_API_VERSION = 1``; one built for a
version this core does not support is refused with a message saying which
versions are supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import pluggy

from ai_platform.operations import ModelCall, ModelResult, Operation, ResponseMeta

PROJECT_NAME = "ai_platform"
PLUGIN_API_VERSION = 1
SUPPORTED_PLUGIN_API_VERSIONS = (1,)

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_operations(config: Mapping[str, Any]) -> list[Operation]:  # type: ignore[empty-body]
    """Return the operations this plugin provides.

    ``config`` is this plugin's section of the plugin configuration file
    (``PLUGINS_CONFIG``), with ``{env = "NAME"}`` values resolved from the
    environment. Called once at startup in every worker: it must be cheap and
    free of side effects (no model loading, no I/O). Each operation is
    validated; a plugin whose operations are invalid is reported and skipped.
    """


@hookspec(firstresult=True)
def build_model_call(operation: Operation, request: Any) -> ModelCall:  # type: ignore[empty-body]
    """Turn a validated request into the model call (``Generate`` or ``Choose``).

    The core's implementation calls ``operation.prompt(request)``. Implement it
    with ``@hookimpl(wrapper=True)`` to inspect or replace the call on its way
    to the model, e.g. to redact personal data: ``call = yield`` gives the
    call, and what the wrapper returns is used instead.
    """


@hookspec(firstresult=True)
def build_response(  # type: ignore[empty-body]
    operation: Operation, request: Any, result: ModelResult, meta: ResponseMeta
) -> msgspec.Struct:
    """Turn the model's result into the operation's response struct.

    The core's implementation calls ``operation.respond(request, result, meta)``.
    Wrappers (``wrapper=True``) may post-process the response before it is
    validated and sent.
    """
