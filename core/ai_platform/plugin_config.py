"""Per-plugin configuration: one TOML table per plugin, secrets only from the environment.

```toml
[redact]
mask = "[redacted]"

[my_plugin]
api_token = { env = "MY_PLUGIN_TOKEN" }   # read from the environment at startup
```

A setting whose name looks secret (``*key*``, ``*token*``, ``*secret*``,
``*password*``) must use ``{ env = "..." }``: a literal secret in the file is
refused, so secrets never sit in a file that may be copied around.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ai_platform.errors import ConfigurationError

_SECRET_NAME = re.compile(r"key|token|secret|password|passwd|credential", re.IGNORECASE)


def read_plugin_config(path: Path | None) -> dict[str, dict[str, Any]]:
    """Read the file's tables (plugin name → raw section); no file means no configuration."""
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"PLUGINS_CONFIG: cannot read {path}: {exc}") from None
    bad = [name for name, section in data.items() if not isinstance(section, dict)]
    if bad:
        raise ConfigurationError(f"PLUGINS_CONFIG: top-level entries must be [tables], not values: {', '.join(bad)}")
    return data


def resolve_section(section: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Resolve ``{env = "NAME"}`` values; raise ``ValueError`` naming a missing variable or a literal secret."""
    environ = os.environ if environ is None else environ
    resolved: dict[str, Any] = {}
    for name, value in section.items():
        if isinstance(value, dict) and set(value) == {"env"}:
            variable = str(value["env"])
            if variable not in environ:
                raise ValueError(f"setting {name!r} needs the environment variable {variable}, which is not set")
            resolved[name] = environ[variable]
        elif _SECRET_NAME.search(name) and isinstance(value, str):
            raise ValueError(f'setting {name!r} looks secret: give it as {{ env = "VARIABLE" }}, not in the file')
        else:
            resolved[name] = value
    return resolved
