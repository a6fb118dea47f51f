"""A model folder's ``manifest.json``: its format, and the integrity check against it at load.

The manifest lists every file of the folder with its size and sha256, so a
truncated copy, a swapped weight file or a stray edit stops the model from
loading instead of serving silently wrong answers. Folders without a manifest
(hand-made or older exports) load unchecked. The exporter writes it
(``ai_platform.export.model_folder.write_manifest``) with :func:`sha256_of`; this module
imports nothing outside the standard library, so the export environment can use it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"


class ManifestMismatch(ValueError):
    """A model folder's files differ from its manifest."""


def sha256_of(path: Path, progress: Callable[[int], object] | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; ``progress`` is called with each chunk's size."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def verify_manifest(folder: Path) -> bool:
    """Check ``folder`` against its manifest; False if it has none, ``ManifestMismatch`` if it differs."""
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        return False
    files: dict[str, dict[str, object]] = json.loads(manifest_file.read_text(encoding="utf-8"))["files"]
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise ManifestMismatch(f"{name} is listed in {MANIFEST} but missing")
        if path.stat().st_size != expected["size"]:  # cheap check first: no hashing of a truncated copy
            raise ManifestMismatch(f"{name} has {path.stat().st_size} bytes, {MANIFEST} says {expected['size']}")
        if sha256_of(path) != expected["sha256"]:
            raise ManifestMismatch(f"{name} does not match its sha256 in {MANIFEST}")
    return True
