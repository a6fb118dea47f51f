"""Fixtures of the remote-engine tests: real OpenAI-compatible engines, started once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import remote_engines
from remote_engines import RunningEngine


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEngine]:
    """llama.cpp's server on the demo model's GGUF (``base_url`` ``http://127.0.0.1:PORT/v1``, ``model``,
    ``api_key``). Not built: skips, or fails where ``AI_PLATFORM_REQUIRE_SYSTEM_TOOLS`` is set (CI)."""
    with remote_engines.llama_server(tmp_path_factory.mktemp("llama-server")) as engine:
        yield engine


@pytest.fixture(scope="session")
def platform_engine(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[RunningEngine]:
    """A second AI Platform serving the demo model on ``/v1`` (``OPENAI_API=true``), with a client key."""
    with remote_engines.platform_engine(tmp_path_factory.mktemp("platform-engine"), demo_model_dir) as engine:
        yield engine
