"""Shared fixtures. ``tiny_model_dir`` and ``platform_client`` come from ai_platform.testing (a pytest plugin)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ai_platform.testing import platform_env
from support import DEMO_MODEL_DIR


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The SmolLM2-135M-Instruct demo model built by ``make install``."""
    if not (DEMO_MODEL_DIR / "model.onnx").exists():
        pytest.fail(f"demo model missing at {DEMO_MODEL_DIR}: run `make install` first")
    return DEMO_MODEL_DIR


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Settings variables for an isolated app serving the three built-in operations."""
    env = platform_env(tmp_path, ENABLED_PLUGINS="summarize,translate,classify")
    del env["DEFAULT_MODEL"]  # the seed's OPERATION_MODEL_MAP applies
    return env
