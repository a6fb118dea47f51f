"""Builds a recipe into a model folder: Hugging Face checkpoint → ONNX → agreement with torch → manifest → publish."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ai_platform.export.agreement import Agreement, Threshold, ValidationFailed
from ai_platform.export.model_folder import (
    build_lock,
    is_current,
    missing_files,
    publish,
    read_export_record,
    staging_dir,
    write_manifest,
    write_stamp,
)
from ai_platform.export.progress import Progress

FORMATS = ("optimum", "genai")
PRECISIONS = ("fp32", "int8", "int4")  # of the weights; both formats export each


@dataclass(frozen=True)
class Recipe:
    """How to produce one model.

    ``prepare`` writes a Hugging Face folder (weights, tokenizer, chat template) under the work dir
    it is given and returns it. Bump ``version`` whenever the output changes, so old folders are rebuilt.
    ``format`` picks the exporter: ``optimum`` (standard ops; int8 and int4 quantized after export) or
    ``genai`` (onnxruntime-genai's builder, run by ``genai_python``: fused attention, quantizes itself, with
    ``builder_options``: its quantization options, see ``genai_builder.quantization_options``).
    """

    name: str
    version: str
    prepare: Callable[[Path, Progress], Path]
    format: str = "optimum"
    precision: str = "fp32"
    genai_python: str | None = None
    builder_options: tuple[tuple[str, str], ...] = ()


def _export(recipe: Recipe, hf_dir: Path, staging: Path, work: Path) -> tuple[str, dict[str, str]]:
    """Run the recipe's exporter; returns the graph's file name and the tool versions."""
    from ai_platform.export.onnx_export import export_onnx, tool_versions

    if recipe.format == "optimum":
        export_onnx(hf_dir, staging)
        return "model.onnx", tool_versions()
    if recipe.format != "genai" or recipe.genai_python is None:
        raise ValueError(f"format must be one of {', '.join(FORMATS)} (genai needs genai_python)")
    from ai_platform.export.genai_builder import builder_versions, export_genai

    options = dict(recipe.builder_options)
    export_genai(hf_dir, staging, recipe.precision, recipe.genai_python, work / "builder-cache", options)
    filename = json.loads((staging / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    return str(filename), {**tool_versions(), **builder_versions(recipe.genai_python)}


def build(
    recipe: Recipe, out: Path, work_root: Path, *, threshold: Threshold | None = None, strict: bool = False
) -> None:
    """Build ``recipe`` into ``out`` unless it already holds that build.

    An export whose agreement with its fp32 source misses ``threshold`` is published with a warning, or with
    ``strict`` refused: ``ValidationFailed``, and ``out`` left as it was (an up-to-date folder is judged on
    the agreement it recorded).
    """
    if recipe.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {recipe.precision!r}")
    if threshold is None:
        threshold = Threshold()
    progress = Progress()
    with build_lock(out):
        if is_current(out, recipe.name, recipe.version):
            progress.note(f"{out} is up to date ({recipe.name} {recipe.version})")
            recorded = read_export_record(out)
            if recorded is not None and recorded.agreement is not None:
                _judge(recorded.agreement, threshold, strict, progress, published=True)
            return
        progress.note(f"building {recipe.name} {recipe.version} ({recipe.format}, {recipe.precision}) into {out}")
        # Imported only now: torch alone takes seconds, and an up-to-date check must not pay for it.
        with progress.step("imported torch, transformers and optimum"):
            from ai_platform.export.logits import keep_last_logits
            from ai_platform.export.validate import validate

        work = work_root / f"{recipe.name}-{recipe.version}"  # variants of one model may build at once
        staging = staging_dir(out)
        for leftover in (work, staging):
            shutil.rmtree(leftover, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            hf_dir = recipe.prepare(work, progress)
            with progress.step(f"exported ONNX with {recipe.format}"):
                model_file, versions = _export(recipe, hf_dir, staging, work)
            with progress.step("added the num_logits_to_keep input"):
                if not keep_last_logits(staging / model_file):
                    progress.note("  lm_head not recognised: the graph keeps full logits")
            if recipe.format == "optimum" and recipe.precision != "fp32":
                from ai_platform.export.quantize import quantize

                with progress.step(f"quantized the weights to {recipe.precision} (MatMulNBits)"):
                    quantize(staging / model_file, recipe.precision, work)
            with progress.step("compared ONNX with torch fp32 on the calibration text"):
                answer, agreement = validate(hf_dir, staging, model_file, exact=recipe.precision == "fp32")
            passed = _judge(agreement, threshold, strict, progress)
            progress.note(f"  greedy ids {answer.greedy_ids} after prompt ids {answer.prompt_ids}")

            details = {
                "format": recipe.format,
                "precision": recipe.precision,
                **({"builder_options": dict(recipe.builder_options)} if recipe.format == "genai" else {}),
                "built_with": versions,
                "validation": asdict(answer),
                "agreement": {
                    "reference": "torch fp32",
                    **asdict(agreement),
                    "min_top1": threshold.min_top1,
                    "max_mean_kl": threshold.max_mean_kl,
                    "passed": passed,
                },
            }
            write_stamp(staging, recipe.name, recipe.version, details)
            with progress.step("wrote the sha256 manifest"):
                write_manifest(staging)
            if missing := missing_files(staging):
                raise RuntimeError(f"export of {recipe.name} lacks {', '.join(missing)}")
            publish(staging, out)
        finally:  # a refused or failed build leaves nothing behind but the folder as it was
            for leftover in (work, staging):
                shutil.rmtree(leftover, ignore_errors=True)
        size = sum(path.stat().st_size for path in out.iterdir())
        progress.note(f"published {out} ({size / 1e6:.1f} MB)")


def _judge(
    agreement: Agreement, threshold: Threshold, strict: bool, progress: Progress, *, published: bool = False
) -> bool:
    """Report ``agreement``; whether it meets ``threshold`` (if not: a warning, or with ``strict`` a refusal).

    ``published``: the agreement is a folder's record, built earlier (without ``strict``, or to a laxer threshold).
    """
    progress.note(
        f"  agreement with torch fp32 over {agreement.positions} positions: top-1 {agreement.top1:.3f}, "
        f"mean KL {agreement.mean_kl:.3g} nats, max |logit diff| {agreement.max_logit_diff:.2e}"
    )
    shortfalls = threshold.shortfalls(agreement)
    if not shortfalls:
        return True
    message = f"{'; '.join(shortfalls)} (agreement with the fp32 source on the calibration text)"
    if strict and published:
        raise ValidationFailed(
            f"refused (--strict): {message}; the folder was published by an earlier export: delete it, or "
            "export again at a higher precision"
        )
    if strict:
        raise ValidationFailed(f"refused (--strict): {message}; nothing was published")
    progress.warn(f"{message}; serve it only if that loss is acceptable, or export at a higher precision")
    return False
