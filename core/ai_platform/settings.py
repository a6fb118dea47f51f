"""Settings: one typed object read once from the environment and ``.env``.

:class:`PluginSettings` is its part that chooses plugins and their models, all that
``ai-platform plugins`` reads: listing needs no secrets. ``ai-platform eval`` and ``selftest``
read those and how models run (:meth:`Settings.for_models`): they serve no HTTP, so no keys either.

Environment variables win over the ``.env`` file. List settings accept a JSON
list (the seed's ``VALID_API_KEYS=["a","b"]``) or a comma-separated string.
Invalid values raise :class:`ConfigurationError` naming the variable: among them
the placeholder secrets of ``.env.example`` and the seed guide, blank secrets,
keys with quotes or surrounding whitespace, and a ``DATABASE_URL`` that is not
``sqlite://`` or ``postgres://`` (``postgresql://``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from dotenv import dotenv_values

from ai_platform.errors import ConfigurationError
from ai_platform.remote.target import is_remote, parse_target

SEED_OPERATION_MODEL_MAP = {
    "summarize": "qwen-summarize",
    "translate": "qwen-translate",
    "classify": "qwen-classify",
}

# Secrets that were published as examples: in .env.example (issue 11: its keys worked, `admin-key-change-me`
# changed limits) and in the seed guide (its .env and its curl examples). Compared case-insensitively.
PLACEHOLDER_SECRETS = frozenset(
    {
        "change-me-to-a-long-random-string",  # .env.example
        "key-for-service-a",  # .env.example, the seed guide's .env
        "key-for-service-b",
        "admin-key-change-me",  # .env.example
        "your-64-char-random-string-here",  # the seed guide's .env
        "local-dev-key-001",  # the seed guide's curl examples
    }
)
# Any other value that asks to be replaced: change-me, changeme, CHANGE_ME, replace-me, ...
PLACEHOLDER_PATTERN = re.compile(r"(change|replace)[-_ ]?me", re.IGNORECASE)
QUOTES = "\"'`"
GENERATE_HINT = 'generate secrets with: python3 -c "import secrets; print(secrets.token_urlsafe(48))"'
DATABASE_SCHEMES = ("sqlite", "postgres", "postgresql")

# Where models run; the one list of choices. Checked where a value enters: here, reading EXECUTION_PROVIDER,
# and by the runtime's InferenceEngine for callers that build it directly; below that it is trusted.
ExecutionProvider = Literal["auto", "cpu", "cuda"]
EXECUTION_PROVIDERS: tuple[ExecutionProvider, ...] = get_args(ExecutionProvider)

# What `ai-platform eval` and `selftest` read besides the plugin settings (Settings.for_models): how models
# are found and run, as `serve` runs them.
MODEL_SETTINGS = (
    "models_dir",
    "execution_provider",
    "max_queue_per_model",
    "max_batch_per_model",
    "prefix_cache_mb",
    "kv_cache_mb",
    "model_isolation",
    "request_timeout_seconds",  # a remote engine's default timeout
)

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]


class PluginSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The settings that choose plugins and their models: all that listing them needs.

    No secrets among them, so ``ai-platform plugins`` works in a folder without ``.env``.
    Field ``foo_bar`` is read from the variable ``FOO_BAR``.
    """

    operation_model_map: dict[str, NonEmptyStr] = msgspec.field(default_factory=lambda: dict(SEED_OPERATION_MODEL_MAP))
    default_model: NonEmptyStr | None = None
    enabled_plugins: list[NonEmptyStr] | None = None
    disabled_plugins: list[NonEmptyStr] = msgspec.field(default_factory=list)
    strict_plugins: bool = False
    plugins_config: Path | None = None
    # The OpenAI-compatible API (/v1) and its operation, chat: a plugin of the core's, loaded only when true.
    openai_api: bool = False

    def __post_init__(self) -> None:
        # A remote engine's URL (openai+http://HOST:PORT/v1#MODEL) is checked here, as the map is read.
        for operation, model in self.operation_model_map.items():
            if is_remote(model):
                parse_target(model, setting=f"OPERATION_MODEL_MAP['{operation}']")
        if self.default_model is not None and is_remote(self.default_model):
            parse_target(self.default_model, setting="DEFAULT_MODEL")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, env_file: str | Path | None = ".env") -> Self:
        """Read settings from ``environ`` (default ``os.environ``) over ``env_file``."""
        return cls.from_mapping(_environment(environ, env_file))

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> Self:
        """Build settings from variable names to raw string values (unknown names are ignored)."""
        raw: dict[str, Any] = {}
        for field in msgspec.structs.fields(cls):
            name = field.name.upper()
            if name in values:
                raw[field.name] = _parse(name, values[name], field.type)
        try:
            return msgspec.convert(raw, cls, strict=False, dec_hook=_decode_path)
        except msgspec.ValidationError as exc:
            raise ConfigurationError(_name_setting(str(exc))) from None


class Settings(PluginSettings, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """All configuration: the plugin settings and the rest. Field ``foo_bar`` is read from ``FOO_BAR``."""

    app_name: str = "AI Platform"
    secret_key: Annotated[str, msgspec.Meta(min_length=16)]
    valid_api_keys: Annotated[list[NonEmptyStr], msgspec.Meta(min_length=1)]
    admin_api_keys: list[NonEmptyStr] = msgspec.field(default_factory=list)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_dir: Path = Path("logs")
    log_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 10 * 1024 * 1024
    log_backup_count: Annotated[int, msgspec.Meta(ge=1)] = 5
    audit_retention_days: Annotated[int, msgspec.Meta(ge=0)] = 90
    default_daily_limit: PositiveInt = 1000
    limit_timezone: NonEmptyStr = "UTC"
    models_dir: Path = Path("models")
    database_url: NonEmptyStr = "sqlite://data/ai_platform.sqlite3"
    execution_provider: ExecutionProvider = "auto"
    max_queue_per_model: PositiveInt = 32
    max_batch_per_model: PositiveInt = 16
    prefix_cache_mb: Annotated[int, msgspec.Meta(ge=0)] = 64
    kv_cache_mb: PositiveInt = 4096
    model_isolation: Literal["process", "thread"] = "process"
    request_timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    metrics_access: Literal["admin", "loopback"] = "admin"
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8000

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            ZoneInfo(self.limit_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(f"LIMIT_TIMEZONE: unknown time zone {self.limit_timezone!r}") from None
        problems = [
            *_secret_problems("SECRET_KEY", [self.secret_key]),
            *_secret_problems("VALID_API_KEYS", self.valid_api_keys),
            *_secret_problems("ADMIN_API_KEYS", self.admin_api_keys),
        ]
        if problems:  # all of them at once: an admin fixing .env.example's three placeholders restarts once
            hint = f" ({GENERATE_HINT})" if any("placeholder" in p for p in problems) else ""
            raise ConfigurationError("; ".join(problems) + hint)
        problem = _database_url_problem(self.database_url)
        if problem:
            raise ConfigurationError(f"DATABASE_URL: {problem}")

    @classmethod
    def for_models(cls, environ: Mapping[str, str] | None = None, *, env_file: str | Path | None = ".env") -> Self:
        """Settings for commands that run models but serve no HTTP (``ai-platform eval``, ``selftest``).

        Only the plugin settings and :data:`MODEL_SETTINGS` are read (``environ`` over ``env_file``, as
        :meth:`from_env`), so these commands work in a folder without ``.env`` and never check its keys.
        Every other setting keeps its default, and the secrets, which no request is checked against in
        such a process, are random values nobody knows.
        """
        names = {field.name.upper() for field in msgspec.structs.fields(PluginSettings)}
        names.update(name.upper() for name in MODEL_SETTINGS)
        values = {name: value for name, value in _environment(environ, env_file).items() if name in names}
        values.update(SECRET_KEY=secrets.token_urlsafe(48), VALID_API_KEYS=secrets.token_urlsafe(32))
        return cls.from_mapping(values)

    @property
    def limit_zone(self) -> ZoneInfo:
        """The time zone whose midnight starts a new limit day."""
        return ZoneInfo(self.limit_timezone)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with every secret masked, safe to log."""
        data = msgspec.to_builtins(self, enc_hook=str)
        for key in ("secret_key", "valid_api_keys", "admin_api_keys"):
            data[key] = "***" if isinstance(data[key], str) else [f"*** ({len(data[key])} keys)"]
        data["database_url"] = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", data["database_url"])
        return {k.upper(): v for k, v in data.items()}

    def __repr__(self) -> str:
        return f"Settings({self.redacted()!r})"


def _environment(environ: Mapping[str, str] | None, env_file: str | Path | None) -> dict[str, str]:
    """The variables ``environ`` (default ``os.environ``) sets, over those of ``env_file`` if it exists."""
    values: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(os.environ if environ is None else environ)
    return values


def _secret_problems(name: str, values: list[str]) -> list[str]:
    """What is wrong with a secret setting's values, each naming the variable and never the value."""
    problems = []
    for index, value in enumerate(values, start=1):
        which = "" if name == "SECRET_KEY" else f"key {index}" + (f" of {len(values)}" if len(values) > 1 else "")
        which = f"{which} " if which else ""
        if not value.strip():
            why = "is blank (only whitespace)"
        elif value.strip().lower() in PLACEHOLDER_SECRETS or PLACEHOLDER_PATTERN.search(value):
            why = "is a placeholder from .env.example or the seed guide, not a secret"
        elif value != value.strip():
            why = "has whitespace around it (an HTTP header cannot carry that; remove it)"
        elif name == "SECRET_KEY" and value[0] in QUOTES and value[-1] == value[0]:
            why = "is wrapped in quote characters (quoted twice in .env?)"
        elif name != "SECRET_KEY" and any(q in value for q in QUOTES):
            why = f'contains a quote character (quoted twice in .env? write {name}=["a","b"] or {name}=a,b)'
        elif any(ord(c) < 32 or ord(c) == 127 for c in value):
            why = "contains a control character"
        else:
            continue
        problems.append(f"{name}: {which}{why}")
    return problems


def _database_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the usage database (never repeating its password), or None."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "not a URL; use sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE"
    if scheme.lower() not in DATABASE_SCHEMES:
        return f"unsupported scheme {scheme[:20]!r}; use sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE"
    if scheme.lower() == "sqlite":
        return None if rest.split("?")[0] else "no file after sqlite:// (e.g. sqlite://data/ai_platform.sqlite3)"
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "the port is not a number between 0 and 65535"
    if not parts.path.strip("/"):
        return "no database name (postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
    return None


def _decode_path(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise NotImplementedError


def _is_collection(annotation: Any) -> bool:
    text = repr(annotation)
    return text.startswith(("list[", "dict[")) or "list[" in text.split("|")[0]


def _parse(name: str, value: str, annotation: Any) -> Any:
    """Decode JSON for list/dict settings; leave scalars for msgspec's lax conversion."""
    if not _is_collection(annotation):
        return value
    text = value.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{name}: not valid JSON ({exc.msg})") from None
    if "dict[" in repr(annotation):
        raise ConfigurationError(f"{name}: expected a JSON object")
    return [item.strip() for item in text.split(",") if item.strip()]


def _name_setting(message: str) -> str:
    """Turn msgspec's ``... - at `$.valid_api_keys` `` into ``VALID_API_KEYS: ...``."""
    if " - at `$." in message:
        text, _, path = message.partition(" - at `$.")
        field = path.rstrip("`").split("[")[0].split(".")[0]
        return f"{field.upper()}: {text}"
    if message.startswith("Object missing required field `"):
        field = message.split("`")[1]
        return f"{field.upper()}: required setting is missing"
    return message
