"""Real OpenAI-compatible engines as subprocesses, for the remote-engine tests (issue 14, item 3).

- llama.cpp's server (``llama-cpp-python[server]``, built by ``make remote-engines`` into
  ``.cache/llama-venv``) on the demo model's GGUF file (``.cache/test-models``): a server no one here wrote.
- a second AI Platform (``ai-platform serve`` with ``OPENAI_API=true``) on the demo model folder.

Each runs on a free loopback port, its output in a log file that a failed start shows; stopping it is
terminate, then kill.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

from ai_platform.testing import CLIENT_KEY, platform_env
from support import REQUIRE_SYSTEM_TOOLS, free_port

ROOT = Path(__file__).resolve().parents[2]
LLAMA_VENV = Path(os.environ.get("AI_PLATFORM_LLAMA_VENV", ROOT / ".cache" / "llama-venv"))
DEMO_GGUF = Path(
    os.environ.get("AI_PLATFORM_DEMO_GGUF", ROOT / ".cache" / "test-models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
)
LLAMA_MODEL_ID = "smollm2"  # the llama.cpp server's --model_alias: the id its /v1/models lists
LLAMA_API_KEY = "test-llama-key-0123456789"
START_SECONDS = 60


@dataclass
class RunningEngine:
    """An engine process and how to reach it: ``base_url`` ends in ``/v1``, as OpenAI clients want it."""

    base_url: str
    model: str
    api_key: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def output(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"{self.base_url} exited ({self.process.returncode}):\n{self.output()}"


def missing_engine(what: str) -> NoReturn:
    """Skip: ``what`` is not built (a developer's machine); fail where CI requires every system tool."""
    reason = f"{what} not built: run `make remote-engines` (`make test` does where a C++ compiler is installed: apt install g++ cmake)"
    if os.environ.get(REQUIRE_SYSTEM_TOOLS, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_SYSTEM_TOOLS} is set, so this test may not be skipped", pytrace=False)
    pytest.skip(reason)


def llama_server_python() -> Path:
    """The llama.cpp server environment's Python and the GGUF file are both there, or the test skips/fails."""
    if not (LLAMA_VENV / ".installed").is_file():
        missing_engine(f"llama.cpp's server ({LLAMA_VENV})")
    if not DEMO_GGUF.is_file():
        missing_engine(f"the demo model's GGUF file ({DEMO_GGUF})")
    return LLAMA_VENV / "bin" / "python"


@contextmanager
def _process(
    command: list[str], *, env: dict[str, str], cwd: Path, log: Path, ready: str, headers: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command`` (output to ``log``), wait until GET ``ready`` answers 200; terminate, then kill."""
    with log.open("ab") as sink:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[:3]} exited ({process.returncode}):\n{log.read_text(errors='replace')[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{ready} not ready in {START_SECONDS} s:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                if httpx.get(ready, headers=headers, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def llama_server(folder: Path) -> Iterator[RunningEngine]:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python) on the demo GGUF, with an API key.

    - no ``--chat_format``: the GGUF's own chat template (ChatML, with SmolLM's default system prompt),
      the template the platform's demo export uses too;
    - ``--logits_all True`` (the server's default, stated): logprobs need the logits of every position;
    - ``--interrupt_requests False``: by default a new request *interrupts* the one being generated (a
      single-model server serving one at a time); an engine behind the platform must queue them instead;
    - 2 threads: the development machine has 2 cores.
    """
    python = llama_server_python()
    port = free_port()
    command = [
        str(python), "-m", "llama_cpp.server",
        "--model", str(DEMO_GGUF), "--model_alias", LLAMA_MODEL_ID,
        "--host", "127.0.0.1", "--port", str(port), "--api_key", LLAMA_API_KEY,
        "--n_ctx", "2048", "--n_threads", "2", "--n_threads_batch", "2",
        "--logits_all", "True", "--interrupt_requests", "False", "--verbose", "False",
    ]  # fmt: skip
    base_url = f"http://127.0.0.1:{port}/v1"
    headers = {"Authorization": f"Bearer {LLAMA_API_KEY}"}
    log = folder / "llama-server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with _process(command, env=env, cwd=folder, log=log, ready=f"{base_url}/models", headers=headers) as process:
        yield RunningEngine(base_url, LLAMA_MODEL_ID, LLAMA_API_KEY, process, log)


@contextmanager
def platform_engine(folder: Path, model_dir: Path, **settings: str) -> Iterator[RunningEngine]:
    """A second AI Platform (``ai-platform serve``, ``OPENAI_API=true``) serving ``model_dir`` on ``/v1``.

    Its client key is ``ai_platform.testing.CLIENT_KEY``; its model id is what its ``/v1/models`` lists.
    """
    port = free_port()
    env = platform_env(
        folder, ENABLED_PLUGINS="chat", OPENAI_API="true", MODELS_DIR=str(model_dir.parent),
        DEFAULT_MODEL=model_dir.name, DEFAULT_DAILY_LIMIT="1000000", **settings,
    )  # fmt: skip
    cli = Path(sys.executable).parent / "ai-platform"
    base_url = f"http://127.0.0.1:{port}/v1"
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    log = folder / "platform-engine.log"
    # cwd: a folder with no .env, so only these settings apply.
    with _process(
        [str(cli), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env}, cwd=folder, log=log, ready=f"{base_url}/models", headers=headers,
    ) as process:  # fmt: skip
        models = httpx.get(f"{base_url}/models", headers=headers, timeout=10).json()
        yield RunningEngine(base_url, models["data"][0]["id"], CLIENT_KEY, process, log)
