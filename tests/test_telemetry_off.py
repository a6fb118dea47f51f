"""onnxruntime's telemetry is off in every process the project starts, before the library loads (issue 11 #18).

onnxruntime 1.29+ on Linux resolves mobile.events.data.microsoft.com about 10 s after it loads unless
``ORT_DISABLE_TELEMETRY=1`` is in the environment when it initialises. ``ai_platform/__init__.py`` sets it
first thing; these tests check, in fresh interpreters without the variable, that it is set by the time any
entry point of the project imports onnxruntime. tests/reliability/test_air_gapped.py watches the real server
from outside (strace) for the network traffic itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Records the variable's value at the moment onnxruntime is first imported (None: not set then).
WATCH = """
import os, sys

class Watch:
    seen = "never imported"

    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" and Watch.seen == "never imported":
            Watch.seen = os.environ.get("ORT_DISABLE_TELEMETRY")
        return None

sys.meta_path.insert(0, Watch())
import {module}
import onnxruntime
print(Watch.seen)
"""


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}


@pytest.mark.parametrize(
    "module",
    [
        "ai_platform",
        "ai_platform.cli",  # the `ai-platform` command; uvicorn's workers import ai_platform.cli:app_factory
        "ai_platform.app",
        "ai_platform.runtime.engine",
        "ai_platform.runtime.model_process",  # what a model process unpickles first
        "ai_platform.runtime.onnx_model",
        "ai_platform.testing",  # the pytest plugin of the plugin author kit
    ],
)
def test_telemetry_is_off_before_onnxruntime_loads(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WATCH.format(module=module)], env=clean_environment(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1"], result.stdout
