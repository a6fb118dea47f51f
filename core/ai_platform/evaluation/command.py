"""``ai-platform eval`` and ``ai-platform selftest`` (registered by ``ai_platform.cli``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ai_platform.errors import ConfigurationError, PluginError
from ai_platform.evaluation.examples import SPLIT_CHOICES
from ai_platform.settings import Settings


def _settings() -> Settings:
    """The plugin and model settings only: eval and selftest serve no HTTP, so they need no ``.env`` or keys."""
    try:
        return Settings.for_models()
    except ConfigurationError as exc:
        sys.exit(f"ai-platform: invalid configuration: {exc}")


def _plugins(settings: Settings) -> Any:
    from ai_platform.plugins import load_configured_plugins

    try:
        return load_configured_plugins(settings)
    except (PluginError, ConfigurationError) as exc:
        sys.exit(f"ai-platform: {exc}")


def _eval_engine_factory(
    settings: Settings, remote: Mapping[str, str] | None = None
) -> Callable[[Path, Mapping[str, str]], Any]:
    """Engines for eval's targets; ``remote`` maps the stand-in folder name of a remote engine to its URL."""
    remote = remote or {}

    def build(models_dir: Path, operation_models: Mapping[str, str]) -> Any:
        from ai_platform.engine_router import build_engine

        models = {name: remote.get(folder, folder) for name, folder in operation_models.items()}
        # In this process: eval is a tool, not a server.
        return build_engine(settings, models, models_dir=models_dir, isolation="thread")

    return build


def _remote_stand_in(value: str) -> str:
    """A folder name standing for a remote engine in eval's plan (which keys its targets by path)."""
    import hashlib

    return "remote-" + hashlib.sha256(value.encode()).hexdigest()[:16]


def cmd_eval(args: argparse.Namespace) -> None:
    from ai_platform.evaluation import metrics
    from ai_platform.evaluation.evaluate import ModelTarget, evaluate, plan, resolve_model, total_examples
    from ai_platform.evaluation.report import as_json, table

    missing = metrics.missing_modules()
    if missing:
        sys.exit(f"ai-platform eval: {', '.join(missing)} missing: {metrics.EVAL_EXTRA_HINT}")
    if args.limit is not None and args.limit < 1:
        sys.exit("ai-platform eval: --limit must be at least 1")
    settings = _settings()
    loaded = _plugins(settings)
    operations = loaded.operations
    if args.operation:
        unknown = [name for name in args.operation if name not in operations]
        if unknown:
            sys.exit(f"ai-platform eval: unknown operation {', '.join(unknown)}; available: {', '.join(operations)}")
        names = list(dict.fromkeys(args.operation))
    else:
        names = []
        for name, operation in operations.items():
            try:
                has_examples = bool(operation.load_examples())
            except ValueError as exc:
                sys.exit(f"ai-platform eval: {exc}")
            if has_examples:
                names.append(name)
            else:
                print(f"ai-platform eval: {name} ships no examples; skipped", file=sys.stderr)
    if not names:
        sys.exit("ai-platform eval: no operation with examples")
    try:
        models = [resolve_model(value, settings.models_dir) for value in args.model or []]
        reference = resolve_model(args.reference, settings.models_dir) if args.reference else None
    except ValueError as exc:
        sys.exit(f"ai-platform eval: {exc}")
    configured: dict[str, ModelTarget] = {}
    remote: dict[str, str] = {}
    if not models:
        from ai_platform.remote.target import is_remote

        for name, folder in loaded.assign_models(settings).items():
            if is_remote(folder):  # a remote engine: named by its URL, built from it (_eval_engine_factory)
                remote[_remote_stand_in(folder)] = folder
                configured[name] = ModelTarget(folder, settings.models_dir / _remote_stand_in(folder))
            else:
                configured[name] = ModelTarget(folder, settings.models_dir / folder)
        unserved = [name for name in names if name not in configured]
        if unserved:
            sys.exit(f"ai-platform eval: no model for {', '.join(unserved)}: pass --model or set OPERATION_MODEL_MAP")
    work = plan(names, models, configured, reference)
    total = total_examples(operations, work, args.split, args.limit)
    progress, close = _progress_bar(total, enabled=not args.no_progress)
    try:
        rows = asyncio.run(
            evaluate(
                {name: operations[name] for name in names},
                work,
                _eval_engine_factory(settings, remote),
                loaded,
                split=args.split,
                limit=args.limit,
                reference=reference,
                progress=progress,
            )
        )
    finally:
        close()
    if args.json:
        print(json.dumps(as_json(rows, split=args.split, limit=args.limit), indent=2, ensure_ascii=False))
    else:
        limit = f", at most {args.limit} per operation" if args.limit else ""
        print(f"ai-platform eval: split {args.split}{limit}")
        print(table(rows))
    if any(row.error is not None for row in rows):
        sys.exit(1)


def _progress_bar(total: int, *, enabled: bool) -> tuple[Callable[[str], None] | None, Callable[[], None]]:
    """A tqdm bar on stderr (shown on a terminal only); nothing without tqdm."""
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        return None, lambda: None
    bar = tqdm(total=total, unit="example", file=sys.stderr, disable=None, dynamic_ncols=True)

    def advance(description: str) -> None:
        bar.set_description(description, refresh=False)
        bar.update(1)

    return advance, bar.close


def cmd_selftest(args: argparse.Namespace) -> None:
    from ai_platform.evaluation.selftest import selftest

    settings = _settings()
    loaded = _plugins(settings)
    models = loaded.assign_models(settings)
    from ai_platform.engine_router import build_engine

    try:
        engine = build_engine(settings, models)  # the engine serve builds
    except ConfigurationError as exc:
        sys.exit(f"ai-platform: invalid configuration: {exc}")

    async def run() -> list[Any]:
        await engine.start()
        try:
            return await selftest(loaded.operations, engine, loaded, timeout=args.timeout)
        finally:
            await engine.close()

    results = asyncio.run(run())
    problems = loaded.problems
    failed = any(not r.passed for r in results) or bool(problems)
    if args.json:
        body = {
            "passed": not failed,
            "operations": [
                {"operation": r.operation, "model": r.model, "result": r.result, "latency_ms": r.latency_ms,
                 "example": r.example, "error": r.error}
                for r in results
            ],
            "failed_plugins": [{"name": p.name, "status": p.status, "error": p.error} for p in problems],
        }  # fmt: skip
        print(json.dumps(body, indent=2))
    else:
        rows = [("OPERATION", "MODEL", "RESULT", "LATENCY MS", "ERROR")]
        for r in results:
            latency = "-" if r.latency_ms is None else f"{r.latency_ms:.0f}"
            rows.append((r.operation, r.model or "-", r.result.upper(), latency, r.error or ""))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
        for p in problems:
            print(f"plugin {p.name}: {p.status}: {p.error}")
        print("selftest: FAILED" if failed else "selftest: passed")
    if failed:
        sys.exit(1)


def add_commands(sub: Any) -> None:
    """Add ``eval`` and ``selftest`` to the ``ai-platform`` command's subparsers."""
    evaluate = sub.add_parser(
        "eval",
        help="score operations on their examples with real models (table: score, latency, tok/s, Δ vs --reference)",
    )
    evaluate.add_argument(
        "--operation",
        action="append",
        metavar="NAME",
        help="operation to evaluate (repeatable; default: all with examples)",
    )
    evaluate.add_argument(
        "--model",
        action="append",
        metavar="FOLDER",
        help="model folder: a name under MODELS_DIR or a path (repeatable; default: each operation's configured model)",
    )
    evaluate.add_argument(
        "--reference", metavar="FOLDER", help="model folder that the others are compared with (Δ REF)"
    )
    evaluate.add_argument(
        "--split", choices=SPLIT_CHOICES, default="all", help="examples to run (default: %(default)s)"
    )
    evaluate.add_argument(
        "--limit", type=int, metavar="N", help="at most N examples per operation, spread over its list"
    )
    evaluate.add_argument("--json", action="store_true", help="machine-readable output, with every example's answer")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=cmd_eval)

    check = sub.add_parser(
        "selftest", help="one example per operation on the configured models (as serve loads them): pass/fail, latency"
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--timeout", type=float, default=60.0, help="seconds per operation (default: %(default)s)")
    check.set_defaults(func=cmd_selftest)
