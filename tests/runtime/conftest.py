"""Fixtures for the runtime tests: the tiny Qwen2 model in both graph shapes, loaded once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ai_platform.runtime.model import LanguageModel
from support import EXPORT_PYTHON, ROOT, genai_args

TINY_GENAI_DIR = ROOT / ".cache" / "test-models" / "tiny-qwen2-genai"


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LanguageModel:
    """The tiny model (optimum graph) on CPU, shared by tests that do not change it."""
    return LanguageModel.load(tiny_model_dir, execution_provider="cpu", intra_op_threads=1)


@pytest.fixture(scope="session")
def tiny_genai_model() -> LanguageModel:
    """The tiny model built by onnxruntime-genai's builder (fp32, GroupQueryAttention)."""
    command = [EXPORT_PYTHON, "-m", "ai_platform.export", "tiny", "--format", "genai", "--out", str(TINY_GENAI_DIR)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "core"))
    subprocess.run([*command, *genai_args()], check=True, env=env, stdout=sys.stderr)
    return LanguageModel.load(TINY_GENAI_DIR, execution_provider="cpu", intra_op_threads=1)


@pytest.fixture(params=["optimum", "genai"])
def any_model(request: pytest.FixtureRequest) -> LanguageModel:
    """Each graph shape the runtime serves, in turn."""
    name = "tiny_model" if request.param == "optimum" else "tiny_genai_model"
    model: LanguageModel = request.getfixturevalue(name)
    return model
