"""The ``ai-platform`` command: serve, inspect plugins, create a development ``.env``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from dotenv import dotenv_values

from ai_platform.errors import ConfigurationError, PluginError
from ai_platform.settings import PluginSettings, Settings

# `ai-platform plugins --url`'s admin key, when not given as --api-key (which other users can read in `ps`).
API_KEY_VARIABLE = "AI_PLATFORM_API_KEY"

# uvicorn's graceful shutdown waits for requests in flight up to REQUEST_TIMEOUT_SECONDS plus this: time
# for a request stopped by its timeout to send its 504. systemd's TimeoutStopSec (deploy/systemd) is longer
# still, by the time the app then needs to close its model processes and write its last audit rows.
GRACEFUL_SHUTDOWN_MARGIN_SECONDS = 10


def graceful_shutdown_seconds(settings: Settings) -> int:
    """How long ``serve`` lets requests in flight finish after SIGTERM (uvicorn's ``timeout_graceful_shutdown``)."""
    return math.ceil(settings.request_timeout_seconds) + GRACEFUL_SHUTDOWN_MARGIN_SECONDS


def app_factory() -> object:
    """Build the app from the environment and ``.env`` (uvicorn calls this in each worker)."""
    from ai_platform.app import create_app

    return create_app(Settings.from_env())


def _settings(read: Callable[[], Settings] = Settings.from_env) -> Settings:
    try:
        return read()
    except ConfigurationError as exc:
        sys.exit(f"ai-platform: invalid configuration: {exc}")


def uvicorn_options() -> dict[str, Any]:
    """How ``serve`` runs uvicorn, besides the app, address, workers and shutdown time (benchmarks reuse it)."""
    from ai_platform.api.http_limits import HeaderLimitedHttpToolsProtocol

    return {
        "log_config": None,  # the app configures logging itself
        "proxy_headers": True,
        "forwarded_allow_ips": "127.0.0.1",
        "server_header": False,
        "http": HeaderLimitedHttpToolsProtocol,  # httptools, with limits on header size and count (431)
    }


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from ai_platform.usage.database import sqlite_folder_problem

    settings = _settings()
    problem = sqlite_folder_problem(settings.database_url)
    if problem:  # a folder the service user cannot use: retrying would not help (systemd restarts it anyway)
        sys.exit(f"ai-platform: cannot start: DATABASE_URL: {problem}")
    # Build the app once here to fail with a readable message rather than in every worker. Its log lines
    # (a plugin that failed, an unused model map entry) are the worker's to write: silenced, they appear once.
    logging.disable(logging.CRITICAL)
    try:
        app_factory()
    except (ConfigurationError, PluginError) as exc:
        sys.exit(f"ai-platform: cannot start: {exc}")
    finally:
        logging.disable(logging.NOTSET)
    uvicorn.run(
        "ai_platform.cli:app_factory",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers,
        # On SIGTERM, requests in flight (queued ones too) may finish; none runs longer than its timeout.
        timeout_graceful_shutdown=graceful_shutdown_seconds(settings),
        **uvicorn_options(),
    )


def cmd_models_export(args: argparse.Namespace) -> None:
    """Run the exporter in the export environment (torch, optimum): the server's own stays lean."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    export_python = Path(
        os.environ.get("AI_PLATFORM_EXPORT_PYTHON", root / ".cache" / "export-venv" / "bin" / "python")
    )
    genai_python = Path(os.environ.get("AI_PLATFORM_GENAI_PYTHON", root / ".cache" / "genai-venv" / "bin" / "python"))
    needed = [export_python] + ([genai_python] if args.format == "genai" else [])
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        sys.exit(f"ai-platform: no export environment at {', '.join(missing)}: run `make export-tools` first")
    out = Path(args.models_dir or _settings(Settings.for_models).models_dir) / args.name  # no keys needed
    command = [str(export_python), "-m", "ai_platform.export", "hf", "--source", args.source, "--out", str(out)]
    command += ["--format", args.format, "--precision", args.precision, "--genai-python", str(genai_python)]
    for option, value in (("--min-top1", args.min_top1), ("--max-kl", args.max_kl)):
        if value is not None:
            command += [option, value]
    if args.strict:
        command.append("--strict")
    for option in args.builder_option:
        command += ["--builder-option", option]
    env = {**os.environ, "PYTHONPATH": str(root / "core"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    sys.exit(subprocess.run(command, env=env).returncode)


def cmd_migrate(args: argparse.Namespace) -> None:
    import asyncio

    from ai_platform.usage.database import Database

    settings = _settings()

    async def migrate() -> None:
        async with Database(settings.database_url).opened():  # opening migrates
            pass

    asyncio.run(migrate())
    print("database schema is up to date")


def cmd_plugins(args: argparse.Namespace) -> None:
    """List plugins as this environment loads them, or as the server at ``--url`` did; exit 1 if one has an error."""
    if args.url:
        view = {"view": "server", "url": args.url}
        heading = f"Plugins of the server at {args.url} (its GET /plugins)"
        plugins = _server_plugins(args.url, args.api_key or os.environ.get(API_KEY_VARIABLE))
    else:
        view = {"view": "local", "environment": sys.prefix}
        heading = (
            f"Plugins as this environment ({sys.prefix}) loads them with the settings here;"
            " a running server's may differ: ai-platform plugins --url URL"
        )
        plugins = _local_plugins()
    if args.json:
        print(json.dumps({**view, "plugins": plugins}, indent=2))
    else:
        print(heading)
        rows = [("NAME", "VERSION", "STATUS", "OPERATIONS", "HOOKS", "ERROR")]
        for p in plugins:
            rows.append(
                (
                    p["name"],
                    p["version"] or "-",
                    p["status"],
                    ",".join(p["operations"]) or "-",
                    ",".join(p["hooks"]) or "-",
                    p["error"] or "",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5])
    if any(p["error"] for p in plugins):  # failed, or lost an operation (no model): what /health calls degraded
        sys.exit(1)


def _local_plugins() -> list[dict[str, Any]]:
    """Load the plugins as ``serve`` would, reading only the plugin settings: listing needs no secrets."""
    from ai_platform.plugins import describe, load_configured_plugins

    try:
        settings = PluginSettings.from_env()
        loaded = load_configured_plugins(settings)
        loaded.assign_models(settings)
    except (PluginError, ConfigurationError) as exc:
        sys.exit(f"ai-platform: {exc}")
    return describe(loaded.plugins)


def _server_plugins(url: str, api_key: str | None) -> list[dict[str, Any]]:
    """The body of the server's ``GET /plugins`` (an admin endpoint), or exit naming what went wrong."""
    import urllib.error
    import urllib.request

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        sys.exit(f"ai-platform: --url must be the server's http:// or https:// address, not {url!r}")
    if not api_key:
        sys.exit(f"ai-platform: --url needs an admin key: set {API_KEY_VARIABLE} (or pass --api-key)")
    endpoint = url.rstrip("/") + "/plugins"
    request = urllib.request.Request(endpoint, headers={"X-API-Key": api_key, "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 403:
            sys.exit(f"ai-platform: {endpoint} refused the key: it needs an admin key (ADMIN_API_KEYS)")
        sys.exit(f"ai-platform: {endpoint} answered {exc.code} {exc.reason}")
    except (urllib.error.URLError, OSError) as exc:
        sys.exit(f"ai-platform: cannot reach {endpoint}: {getattr(exc, 'reason', exc)}")
    except ValueError:
        sys.exit(f"ai-platform: {endpoint} did not answer with JSON: is {url} an AI Platform server?")
    if not isinstance(body, dict) or not isinstance(body.get("plugins"), list):
        sys.exit(f"ai-platform: {endpoint} did not answer with a plugin list: is {url} an AI Platform server?")
    return cast(list[dict[str, Any]], body["plugins"])


def cmd_plugins_new(args: argparse.Namespace) -> None:
    from ai_platform.scaffold import create_plugin

    try:
        root = create_plugin(args.name, Path(args.dir))
    except (ValueError, FileExistsError) as exc:
        sys.exit(f"ai-platform: {exc}")
    print(f"created {root}\nnext: pip install -e '{root}[test]' && pytest {root}")


def cmd_init_env(args: argparse.Namespace) -> None:
    path = Path(args.path)
    if path.exists():
        print(f"{path} exists; leaving it as it is")
        return
    client, admin = f"dev-client-{secrets.token_urlsafe(24)}", f"dev-admin-{secrets.token_urlsafe(24)}"
    model = args.model
    # Created private: the keys are never readable by others, not even for a moment.
    with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "w") as env_file:
        env_file.write(
            "# Development settings written by `ai-platform init-env` (see .env.example for every setting).\n"
            f"SECRET_KEY={secrets.token_urlsafe(48)}\n"
            f'VALID_API_KEYS=["{client}"]\n'
            f'ADMIN_API_KEYS=["{admin}"]\n'
            f'OPERATION_MODEL_MAP={{"summarize":"{model}","translate":"{model}","classify":"{model}"}}\n'
            f"DEFAULT_MODEL={model}\n"
        )
    print(f"wrote {path} with new development keys")


def cmd_keys(args: argparse.Namespace) -> None:
    values = dotenv_values(args.path)
    print(f"API keys (from {args.path}):")
    for name in ("VALID_API_KEYS", "ADMIN_API_KEYS"):
        print(f"  {name}={values.get(name, '')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ai-platform", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API (settings from the environment and .env)")
    serve.add_argument("--host", help="bind address (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: PORT or 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="model folders").add_subparsers(dest="models_command", required=True)
    export = models.add_parser("export", help="export a local Hugging Face folder to a served ONNX model folder")
    export.add_argument("source", help="Hugging Face model folder (config.json, tokenizer, weights); no network used")
    export.add_argument("name", help="folder name to create under MODELS_DIR, e.g. qwen-summarize")
    export.add_argument("--format", choices=("genai", "optimum"), default="genai", help="graph (default: %(default)s)")
    export.add_argument(
        "--precision", choices=("int4", "int8", "fp32"), default="int4", help="weights (default: %(default)s)"
    )
    export.add_argument("--models-dir", help="default: the MODELS_DIR setting")
    # The exporter checks these values and owns their defaults (ai_platform.export.agreement: numpy, not loaded here).
    export.add_argument("--min-top1", help="least top-1 agreement with the fp32 source, 0..1 (default: 0.9)")
    export.add_argument("--max-kl", help="largest mean KL divergence from the fp32 source, nats (default: 0.1)")
    export.add_argument(
        "--strict", action="store_true", help="refuse an export below those (exit 1, nothing published); else warn"
    )
    export.add_argument(
        "--builder-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="genai format: a quantization option of onnxruntime-genai's builder (repeatable; see docs/benchmarks.md)",
    )
    export.set_defaults(func=cmd_models_export)

    migrate = sub.add_parser("migrate", help="create or upgrade the usage database schema")
    migrate.set_defaults(func=cmd_migrate)

    plugins = sub.add_parser(
        "plugins",
        help="list plugins and their status (exit 1 if one has an error); `plugins new NAME` scaffolds one",
        description="List plugins as this environment loads them with the settings here (the plugin settings"
        " only: no secrets needed), or with --url as a running server loaded them. Exits 1 if a plugin failed"
        " or lost an operation.",
    )
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.add_argument("--url", help="a running server's address, e.g. http://127.0.0.1:8000: show its view")
    plugins.add_argument("--api-key", help=f"admin key for --url (default: the {API_KEY_VARIABLE} variable)")
    plugins.set_defaults(func=cmd_plugins)
    new = plugins.add_subparsers(dest="plugins_command").add_parser("new", help="scaffold a new operation package")
    new.add_argument("name", help="operation name, e.g. sentiment")
    new.add_argument("--dir", default=".", help="parent folder (default: current)")
    new.set_defaults(func=cmd_plugins_new)

    init_env = sub.add_parser("init-env", help="write a development .env with generated keys")
    init_env.add_argument("--path", default=".env")
    init_env.add_argument("--model", required=True, help="model folder (under MODELS_DIR) for every operation")
    init_env.set_defaults(func=cmd_init_env)

    keys = sub.add_parser("keys", help="print the API keys configured in a .env file")
    keys.add_argument("--path", default=".env")
    keys.set_defaults(func=cmd_keys)

    from ai_platform.evaluation.command import add_commands  # eval, selftest (issue 12)

    add_commands(sub)

    try:
        try:
            args = parser.parse_args(argv)  # --help prints too
            args.func(args)
        finally:
            sys.stdout.flush()  # here, where a closed pipe can still be caught, not at exit
    except BrokenPipeError:
        # The reader went away (`ai-platform plugins --json | head -1`): stop quietly, as a program killed by
        # SIGPIPE does. stdout now points nowhere, so that Python's own flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)


if __name__ == "__main__":
    main()
