"""Where a remote engine is: the ``openai+http(s)://HOST:PORT/v1?OPTIONS#MODEL`` syntax, parsed and checked.

Standard library only: the settings check every map value with it as they are read, so a mistake stops
startup with a message that names the setting and the operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ai_platform.errors import ConfigurationError

SCHEMES = {"openai+http": "http", "openai+https": "https"}
OPTIONS = ("key_env", "ca_file", "timeout", "connect_timeout", "choose")
ChooseMethod = Literal["logprobs", "generate"]
CHOOSE_METHODS: tuple[ChooseMethod, ...] = ("logprobs", "generate")
DEFAULT_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class RemoteTarget:
    """One map value naming a remote engine and the model it serves.

    ``base_url`` is the engine's URL up to its ``/v1`` path (no query, no key): what ``/health`` shows and
    errors name. ``timeout`` is ``None`` until resolved to ``REQUEST_TIMEOUT_SECONDS``
    (:meth:`with_default_timeout`).
    """

    base_url: str
    model: str
    key_env: str | None = None
    ca_file: str | None = None
    timeout: float | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    choose: ChooseMethod = "logprobs"

    @property
    def pool_key(self) -> tuple[object, ...]:
        """Targets with equal keys share one HTTP client (connection pool): same engine, same options."""
        return (self.base_url, self.key_env, self.ca_file, self.timeout, self.connect_timeout)

    def with_default_timeout(self, seconds: float) -> RemoteTarget:
        """This target, its ``timeout`` defaulting to ``seconds``."""
        if self.timeout is not None:
            return self
        return RemoteTarget(
            self.base_url, self.model, self.key_env, self.ca_file, seconds, self.connect_timeout, self.choose
        )


def is_remote(value: str) -> bool:
    """Whether a map value names a remote engine (else it is a local model folder)."""
    return value.lower().startswith("openai+")


def parse_target(value: str, *, setting: str) -> RemoteTarget:
    """The remote engine that ``value`` names; :class:`ConfigurationError` starting with ``setting`` if invalid.

    ``setting`` says where the value was read, e.g. ``"OPERATION_MODEL_MAP['classify']"``.
    """

    def fail(why: str) -> ConfigurationError:
        return ConfigurationError(f"{setting}: {why} (remote engine syntax: openai+http://HOST:PORT/v1#MODEL)")

    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise fail(f"not a valid URL ({exc})") from None
    scheme = SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise fail(f"unknown scheme {parts.scheme[:20]!r}; use openai+http or openai+https")
    if parts.username is not None or parts.password is not None:
        # Never repeat them: the whole point is that the map holds no secret.
        raise fail("credentials in the URL are not allowed; name the API key's variable with ?key_env=NAME")
    if not parts.hostname:
        raise fail("no host")
    model = parts.fragment.strip()
    if not model:
        raise fail("no model id after '#'")
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    if ":" in parts.hostname:  # an IPv6 address keeps its brackets
        netloc = f"[{parts.hostname}]" + (f":{port}" if port is not None else "")
    base_url = urlunsplit((scheme, netloc, parts.path.rstrip("/"), "", ""))
    options: dict[str, str] = {}
    for name, option in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name not in OPTIONS:
            raise fail(f"unknown option {name[:40]!r}; options are {', '.join(OPTIONS)}")
        if name in options:
            raise fail(f"option {name!r} given twice")
        if not option:
            raise fail(f"option {name!r} has no value")
        options[name] = option
    timeout = _seconds(options, "timeout", fail)
    connect_timeout = _seconds(options, "connect_timeout", fail)
    choose = options.get("choose", "logprobs")
    if choose not in CHOOSE_METHODS:
        raise fail(f"choose must be one of {', '.join(CHOOSE_METHODS)}, not {choose[:40]!r}")
    ca_file = options.get("ca_file")
    if ca_file is not None and scheme != "https":
        raise fail("ca_file needs openai+https")
    key_env = options.get("key_env")
    if key_env is not None and not key_env.replace("_", "a").isalnum():
        raise fail(f"key_env must be an environment variable's name, not {key_env[:40]!r}")
    return RemoteTarget(
        base_url=base_url,
        model=model,
        key_env=key_env,
        ca_file=ca_file,
        timeout=timeout,
        connect_timeout=DEFAULT_CONNECT_TIMEOUT if connect_timeout is None else connect_timeout,
        choose=choose,
    )


def _seconds(options: dict[str, str], name: str, fail: Callable[[str], ConfigurationError]) -> float | None:
    if name not in options:
        return None
    try:
        seconds = float(options[name])
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise fail(f"option {name!r} must be a number of seconds above 0, not {options[name][:40]!r}")
    return seconds
