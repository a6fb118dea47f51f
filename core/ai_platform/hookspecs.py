"""Hook specifications: the contract between the core and operation plugins.

Plugins implement hooks with ``from ai_platform import hookimpl``. Hooks may
gain arguments over time; an implementation may accept any subset of them
(pluggy's rule), so existing plugins keep working.
"""

from __future__ import annotations

import pluggy

from ai_platform.operations import Operation

PROJECT_NAME = "ai_platform"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_operations() -> list[Operation]:  # type: ignore[type-arg,empty-body]
    """Return the operations this plugin provides.

    Called once at startup in every worker: it must be cheap and free of side
    effects (no model loading, no I/O). Each operation is validated; a plugin
    whose operations are invalid is reported and skipped.
    """
