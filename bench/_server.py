"""Shared by the HTTP benchmarks: a throwaway settings folder and an ``ai-platform serve`` process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-client-key-0123456789"
SEED_FOLDERS = ("qwen-summarize", "qwen-translate", "qwen-classify")


def bench_env(folder: Path, model: Path, **extra: str) -> dict[str, str]:
    """Settings for an isolated server whose three seed operations all use ``model``."""
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name in SEED_FOLDERS:
        if not (models / name).exists():
            (models / name).symlink_to(model.resolve(), target_is_directory=True)
    return {
        "SECRET_KEY": "bench-secret-key-0123456789",
        "VALID_API_KEYS": json.dumps([KEY]),
        "DATABASE_URL": f"sqlite://{folder / 'usage.sqlite3'}",
        "LOG_DIR": str(folder / "logs"),
        "LOG_LEVEL": "WARNING",
        "MODELS_DIR": str(models),
        "DEFAULT_DAILY_LIMIT": "100000000",
        **extra,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(port: int, path: str, body: object) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": KEY},
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def start_server(
    env: dict[str, str],
    cwd: Path,
    command: list[str] | None = None,
    *,
    output: Path | None = None,
    drop: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``.venv/bin/ai-platform serve`` (or ``command`` plus a port) and wait until /health answers.

    ``output``: a file that gets the server's stdout and stderr (default: this process's).
    ``drop``: variables of this process's environment the server must not inherit.
    """
    port = free_port()
    command = command or [str(ROOT / ".venv" / "bin" / "ai-platform"), "serve", "--port"]
    inherited = {name: value for name, value in os.environ.items() if name not in drop}
    sink = open(output, "ab") if output is not None else None  # noqa: SIM115 (the child keeps its own copy)
    try:
        server = subprocess.Popen(
            [*command, str(port)],
            env={**inherited, **env},
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT if sink else None,
        )
    finally:
        if sink is not None:
            sink.close()
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server, port
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("server did not start") from None
            time.sleep(0.3)


def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")
