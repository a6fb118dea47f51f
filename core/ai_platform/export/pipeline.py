"""Builds a recipe into a model folder: Hugging Face checkpoint → ONNX → validation → publish."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ai_platform.export.model_folder import (
    build_lock,
    is_current,
    missing_files,
    publish,
    staging_dir,
    write_stamp,
)
from ai_platform.export.progress import Progress


@dataclass(frozen=True)
class Recipe:
    """How to produce one model.

    ``prepare`` writes a Hugging Face folder (weights, tokenizer, chat template) under the work dir
    it is given and returns it. Bump ``version`` whenever the output changes, so old folders are rebuilt.
    """

    name: str
    version: str
    prepare: Callable[[Path, Progress], Path]


def build(recipe: Recipe, out: Path, work_root: Path) -> None:
    """Build ``recipe`` into ``out`` unless it already holds that build."""
    progress = Progress()
    with build_lock(out):
        if is_current(out, recipe.name, recipe.version):
            progress.note(f"{out} is up to date ({recipe.name} {recipe.version})")
            return
        progress.note(f"building {recipe.name} {recipe.version} into {out}")
        # Imported only now: torch alone takes seconds, and an up-to-date check must not pay for it.
        with progress.step("imported torch, transformers and optimum"):
            from ai_platform.export.onnx_export import export_onnx, tool_versions
            from ai_platform.export.validate import compare_greedy

        work = work_root / recipe.name
        staging = staging_dir(out)
        for leftover in (work, staging):
            shutil.rmtree(leftover, ignore_errors=True)

        hf_dir = recipe.prepare(work, progress)
        with progress.step("exported ONNX with optimum"):
            export_onnx(hf_dir, staging)
        with progress.step("validated ONNX greedy decoding against torch"):
            answer, logit_diff = compare_greedy(hf_dir, staging)
        progress.note(f"  prompt ids {answer.prompt_ids}")
        progress.note(f"  greedy ids {answer.greedy_ids}, max |logit diff| {logit_diff:.2e}")

        details = {"built_with": tool_versions(), "validation": asdict(answer)}
        write_stamp(staging, recipe.name, recipe.version, details)
        if missing := missing_files(staging):
            raise RuntimeError(f"export of {recipe.name} lacks {', '.join(missing)}")
        publish(staging, out)
        shutil.rmtree(work)
        size = sum(path.stat().st_size for path in out.iterdir())
        progress.note(f"published {out} ({size / 1e6:.1f} MB)")
