"""ONNX export of a Hugging Face causal LM folder with optimum."""

from __future__ import annotations

import shutil
import warnings
from importlib.metadata import version
from pathlib import Path

from optimum.exporters.onnx import main_export
from torch.jit import TracerWarning

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def export_onnx(hf_dir: Path, out: Path) -> None:
    """Export ``hf_dir`` to ``out`` as one decoder graph with KV-cache inputs and outputs."""
    with warnings.catch_warnings():
        # Tracing warns about every Python branch on tensor shapes in transformers' code; what matters
        # is whether the graph generates correctly, which validate.py checks.
        warnings.simplefilter("ignore", TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        # optimum's own validation runs dummy inputs; validate.py checks real greedy decoding instead.
        main_export(str(hf_dir), output=out, task="text-generation-with-past", do_validation=False)
    # optimum re-saves the tokenizer through AutoTokenizer, which may rewrite it; ship ours byte for byte.
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)


def tool_versions() -> dict[str, str]:
    """Versions of the packages that shape the exported graph, for the build stamp."""
    return {name: version(name) for name in ("torch", "transformers", "optimum-onnx", "onnxruntime")}
