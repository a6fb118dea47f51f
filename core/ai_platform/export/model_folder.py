"""The exported model folder: required files, build stamp, locking and atomic publishing.

The server reads build stamps too (``read_export_record``), so at import this module needs only what the
server has: no torch, onnx or tqdm (the progress bars, imported where a build needs them). The manifest's
format and hashing are the runtime's (``ai_platform.runtime.manifest``, which checks a folder against it
at load); this module writes it.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ai_platform.export.agreement import Agreement, Threshold
from ai_platform.runtime.manifest import MANIFEST, sha256_of

STAMP = "export.json"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "model.onnx",
    STAMP,
    MANIFEST,
)


def missing_files(folder: Path) -> list[str]:
    """Required files that ``folder`` lacks."""
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def is_current(folder: Path, recipe: str, version: str) -> bool:
    """Whether ``folder`` holds a complete build of this recipe version."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == recipe and stamp.get("version") == version and not missing_files(folder)


@dataclass(frozen=True)
class ExportRecord:
    """What a folder's build stamp says of its quality: read by the server (no torch), written at export."""

    precision: str | None  # of the weights: fp32, int8 or int4
    agreement: Agreement | None  # with the fp32 source on the calibration text; None: not measured
    threshold: Threshold | None  # what it was judged against at export
    passed: bool | None  # whether it met that threshold


def read_export_record(folder: Path) -> ExportRecord | None:
    """The precision and recorded agreement of ``folder``; None without a readable ``export.json``."""
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict):
        return None
    recorded = stamp.get("agreement")
    agreement = threshold = passed = None
    if isinstance(recorded, dict):
        try:
            agreement = Agreement(
                positions=int(recorded["positions"]),
                top1=float(recorded["top1"]),
                mean_kl=float(recorded["mean_kl"]),
                max_logit_diff=float(recorded["max_logit_diff"]),
            )
            threshold = Threshold(min_top1=float(recorded["min_top1"]), max_mean_kl=float(recorded["max_mean_kl"]))
            passed = bool(recorded["passed"])
        except (KeyError, TypeError, ValueError):
            agreement = threshold = passed = None
    precision = stamp.get("precision")
    return ExportRecord(
        precision=precision if isinstance(precision, str) else None,
        agreement=agreement,
        threshold=threshold,
        passed=passed,
    )


def write_stamp(folder: Path, recipe: str, version: str, details: dict[str, Any]) -> None:
    """Mark ``folder`` as a complete build of this recipe version."""
    stamp = {"recipe": recipe, "version": version, **details}
    # One key per line, values compact: token id lists stay readable.
    lines = (f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}" for key, value in stamp.items())
    (folder / STAMP).write_text("{\n" + ",\n".join(lines) + "\n}\n")


def write_manifest(folder: Path) -> None:
    """List every file of ``folder`` with its size and sha256 (written last: it covers the stamp too)."""
    from ai_platform.export.progress import bar

    paths = [path for path in sorted(folder.iterdir()) if path.is_file() and path.name != MANIFEST]
    files = {}
    with bar("sha256", sum(path.stat().st_size for path in paths), "B") as hashed:
        for path in paths:
            files[path.name] = {"size": path.stat().st_size, "sha256": sha256_of(path, hashed.update)}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def staging_dir(folder: Path) -> Path:
    """Where a build is assembled; the leading dot keeps model scanners away from it."""
    return folder.parent / f".{folder.name}.partial"


def publish(staging: Path, folder: Path) -> None:
    """Move a finished build into place, replacing any older build only at the last moment."""
    retired = folder.parent / f".{folder.name}.old"
    shutil.rmtree(retired, ignore_errors=True)
    if folder.exists():
        folder.rename(retired)
    staging.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Serialise builds of one folder (parallel test workers share the tiny model)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
