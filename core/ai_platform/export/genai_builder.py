"""Export with onnxruntime-genai's model builder: fused GroupQueryAttention (+ MatMulNBits for int8/int4).

The builder needs transformers 5.x, which optimum-onnx cannot share an environment
with, so it runs as a subprocess of its own environment's Python (``--genai-python``).
Its folder lacks files the server reads (config.json, generation_config.json) and
rewrites the tokenizer config; those are copied from the source folder byte for byte.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

SOURCE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

# The builder's ``--extra_options`` that change only how weights are quantized, never the graph's
# inputs and outputs the runtime relies on (``exclude_embeds``, ``exclude_lm_head`` would).
QUANTIZATION_OPTIONS = frozenset(
    {
        "block_size",
        "is_symmetric",
        "accuracy_level",
        "algo_config",
        "matmul_mixed_precision",
        "nodes_to_exclude",
        "op_types_to_quantize",
        "shared_embeddings",
    }
)
# What int4 means when the exporter is not told otherwise, chosen by measurement (docs/benchmarks.md, "Int4
# variants"): k-quant rounding (scale and zero point searched per block of 32, not min/max), and the lm_head
# (shared with the embedding) plus llama.cpp's most sensitive matmuls (the first and last eighth of the layers,
# and qkv, v and down of every third) kept at 8 bits. On SmolLM2-135M it moved a third as much probability as
# plain symmetric int4 for 30% more folder; nothing the builder offers at 4 bits reached the agreement threshold.
INT4_DEFAULTS: dict[str, str] = {"algo_config": "k_quant_mixed"}


def quantization_options(precision: str, overrides: Mapping[str, str]) -> dict[str, str]:
    """The builder's quantization options for ``precision``: the int4 defaults, then ``overrides``."""
    if unknown := sorted(overrides.keys() - QUANTIZATION_OPTIONS):
        raise ValueError(
            f"unknown builder option {', '.join(unknown)}; one of {', '.join(sorted(QUANTIZATION_OPTIONS))}"
        )
    if precision == "fp32" and overrides:
        raise ValueError("builder quantization options need --precision int8 or int4")
    return {**(INT4_DEFAULTS if precision == "int4" else {}), **overrides}


def export_genai(hf_dir: Path, out: Path, precision: str, python: str, cache: Path, options: Mapping[str, str]) -> None:
    """Build ``hf_dir`` into ``out`` for the CPU at ``precision`` with the builder in ``python``'s environment.

    ``options``: the builder's quantization options (see ``quantization_options``).
    """
    command = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out)]
    command += ["-p", precision, "-e", "cpu", "-c", str(cache)]
    if options:
        command += ["--extra_options", *(f"{key}={value}" for key, value in options.items())]
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
