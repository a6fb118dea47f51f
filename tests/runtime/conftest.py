"""Fixtures for the runtime tests: the tiny Qwen2 model loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from ai_platform.runtime.model import LanguageModel


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LanguageModel:
    """The tiny model on CPU, shared by tests that do not change it."""
    return LanguageModel.load(tiny_model_dir, execution_provider="cpu", intra_op_threads=1)
