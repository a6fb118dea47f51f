"""The exported model folder: required files, build stamp, locking and atomic publishing."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ai_platform.export.progress import bar

STAMP = "export.json"
# Read by the runtime (ai_platform.runtime.manifest), which refuses a folder that differs from it.
MANIFEST = "manifest.json"
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


def write_stamp(folder: Path, recipe: str, version: str, details: dict[str, Any]) -> None:
    """Mark ``folder`` as a complete build of this recipe version."""
    stamp = {"recipe": recipe, "version": version, **details}
    # One key per line, values compact: token id lists stay readable.
    lines = (f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}" for key, value in stamp.items())
    (folder / STAMP).write_text("{\n" + ",\n".join(lines) + "\n}\n")


def write_manifest(folder: Path) -> None:
    """List every file of ``folder`` with its size and sha256 (written last: it covers the stamp too)."""
    paths = [path for path in sorted(folder.iterdir()) if path.is_file() and path.name != MANIFEST]
    files = {}
    with bar("sha256", sum(path.stat().st_size for path in paths), "B") as hashed:
        for path in paths:
            digest = hashlib.sha256()
            with path.open("rb") as file:
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
                    hashed.update(len(chunk))
            files[path.name] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
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
