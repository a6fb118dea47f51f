"""Shared fixtures: real models built by the export tools, cached under .cache/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import ADMIN_KEY, CLIENT_KEY, DEMO_MODEL_DIR, EXPORT_PYTHON, ROOT, TINY_MODEL_DIR


def _export(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "core"))
    subprocess.run([EXPORT_PYTHON, "-m", "ai_platform.export", *args], check=True, env=env, stdout=sys.stderr)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A random-weight Qwen2 model exported with optimum (built once, then cached)."""
    _export("tiny", "--out", str(TINY_MODEL_DIR))
    return TINY_MODEL_DIR


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
    """Settings variables for an isolated app: its own database, logs and models folder."""
    return {
        "SECRET_KEY": "test-secret-key-0123456789",
        "VALID_API_KEYS": f'["{CLIENT_KEY}"]',
        "ADMIN_API_KEYS": f'["{ADMIN_KEY}"]',
        "DATABASE_URL": f"sqlite://{tmp_path / 'usage.sqlite3'}",
        "LOG_DIR": str(tmp_path / "logs"),
        "MODELS_DIR": str(tmp_path / "models"),
    }
