"""Export with onnxruntime-genai's model builder: fused GroupQueryAttention (+ MatMulNBits for int8/int4).

The builder needs transformers 5.x, which optimum-onnx cannot share an environment
with, so it runs as a subprocess of its own environment's Python (``--genai-python``).
Its folder lacks files the server reads (config.json, generation_config.json) and
rewrites the tokenizer config; those are copied from the source folder byte for byte.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def export_genai(hf_dir: Path, out: Path, precision: str, python: str, cache: Path) -> None:
    """Build ``hf_dir`` into ``out`` for the CPU at ``precision`` with the builder in ``python``'s environment."""
    command = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out)]
    command += ["-p", precision, "-e", "cpu", "-c", str(cache)]
    # The builder draws a bar per tensor it saves; only its errors matter here.
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai builder failed:\n{result.stderr[-4000:]}")
    for name in SOURCE_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)


def builder_versions(python: str) -> dict[str, str]:
    """Versions of the builder environment's packages that shape the graph, for the build stamp."""
    script = "from importlib.metadata import version as v; print(v('onnxruntime-genai'), v('transformers'))"
    genai, transformers = subprocess.run(
        [python, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    return {"onnxruntime-genai": genai, "transformers (builder)": transformers}
