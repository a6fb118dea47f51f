"""Constants and checks shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import NoReturn

import pytest

from ai_platform.testing import ADMIN_KEY, CLIENT_KEY, export_python

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = Path(os.environ.get("AI_PLATFORM_DEMO_MODEL", ROOT / "models" / "smollm2-135m-instruct"))

EXPORT_PYTHON = export_python()
# onnxruntime-genai's builder needs transformers 5.x, so it lives in an environment of its own.
GENAI_PYTHON = os.environ.get("AI_PLATFORM_GENAI_PYTHON", str(ROOT / ".cache" / "genai-venv" / "bin" / "python"))


def genai_args() -> list[str]:
    """The exporter's ``--genai-python`` option; a missing environment fails the test (``make test`` builds it)."""
    if not Path(GENAI_PYTHON).is_file():
        pytest.fail(
            f"no onnxruntime-genai environment at {GENAI_PYTHON}: run `make install` (or set AI_PLATFORM_GENAI_PYTHON)"
        )
    return ["--genai-python", GENAI_PYTHON]


# Tests of the real system programs (nginx, openssl, systemd-analyze, PostgreSQL's initdb and pg_ctl)
# skip where one is missing, naming its Debian package. .ci/run installs them all and sets this
# variable, so that there a missing program fails instead: CI never silently skips these tests.
REQUIRE_SYSTEM_TOOLS = "AI_PLATFORM_REQUIRE_SYSTEM_TOOLS"


def missing_system_tool(what: str, package: str) -> NoReturn:
    """Skip the test because ``what`` is not installed, or fail it when AI_PLATFORM_REQUIRE_SYSTEM_TOOLS is set."""
    reason = f"{what} not installed (apt install {package})"
    if os.environ.get(REQUIRE_SYSTEM_TOOLS, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_SYSTEM_TOOLS} is set, so this test may not be skipped", pytrace=False)
    pytest.skip(reason)


def require_program(program: str, package: str, *, folders: list[str] | None = None) -> str:
    """The path of ``program`` in ``folders`` (default: PATH, then /usr/sbin and /sbin); missing, the test skips
    naming ``package``, or fails where AI_PLATFORM_REQUIRE_SYSTEM_TOOLS is set (missing_system_tool)."""
    if folders is None:
        folders = [os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"]
    found = shutil.which(program, path=os.pathsep.join(folders))
    if found is None:
        missing_system_tool(program, package)
    return found


KEY = {"X-API-Key": CLIENT_KEY}
ADMIN = {"X-API-Key": ADMIN_KEY}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SEED_MODELS = {"summarize": "qwen-summarize", "translate": "qwen-translate", "classify": "qwen-classify"}

SUMMARIZE = {
    "text": "Artificial intelligence is transforming industries worldwide. Machine learning models can now "
    "recognize images, translate languages, and generate human-like text with unprecedented accuracy. "
    "Organizations are investing billions of dollars in AI research and deployment, expecting significant "
    "productivity gains.",
    "max_sentences": 2,
    "language": "en",
    "request_id": "req-001",
}
TRANSLATE = {
    "text": "The quarterly earnings report exceeded all analyst expectations.",
    "source_language": "en",
    "target_language": "ar",
    "request_id": "req-002",
}
CLASSIFY = {
    "text": "My internet connection keeps dropping and the router shows a red light.",
    "categories": ["billing", "technical_support", "sales", "general_inquiry"],
    "request_id": "req-003",
}


def assert_meta(meta: dict[str, object], operation: str, request: dict[str, object]) -> None:
    assert set(meta) == {
        "operation", "model_used", "input_chars", "output_tokens", "execution_time_ms", "request_id", "timestamp",
    }  # fmt: skip
    assert meta["operation"] == operation
    assert meta["model_used"] == SEED_MODELS[operation]
    assert meta["input_chars"] == len(str(request["text"]))
    assert isinstance(meta["output_tokens"], int) and meta["output_tokens"] >= 0
    assert isinstance(meta["execution_time_ms"], float) and meta["execution_time_ms"] >= 0
    assert meta["request_id"] == request["request_id"]
    assert ISO_UTC.match(str(meta["timestamp"]))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
