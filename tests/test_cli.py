"""The `ai-platform` command: setup subcommands (init-env, keys, migrate) and how `serve` starts and stops."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from support import ROOT, free_port, require_program

CLI = str(Path(sys.executable).parent / "ai-platform")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})


def test_init_env_writes_private_keys_once_and_keys_prints_them(tmp_path: Path) -> None:
    assert run("init-env", "--model", "demo", cwd=tmp_path).returncode == 0
    env_file = tmp_path / ".env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    first = env_file.read_text()
    assert '"summarize":"demo"' in first and "DEFAULT_MODEL=demo" in first
    assert "exists; leaving it" in run("init-env", "--model", "other", cwd=tmp_path).stdout
    assert env_file.read_text() == first  # never overwritten
    client_key = first.split('VALID_API_KEYS=["')[1].split('"')[0]
    assert client_key in run("keys", cwd=tmp_path).stdout


def test_migrate_creates_the_usage_database(tmp_path: Path) -> None:
    assert run("init-env", "--model", "demo", cwd=tmp_path).returncode == 0
    result = run("migrate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tables = {
        row[0]
        for row in sqlite3.connect(tmp_path / "data" / "ai_platform.sqlite3").execute("SELECT name FROM sqlite_master")
    }
    assert {"daily_usage", "operation_limit", "audit_record"} <= tables
    assert run("migrate", cwd=tmp_path).returncode == 0  # idempotent


def test_invalid_configuration_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SECRET_KEY=0123456789abcdef0123\nVALID_API_KEYS=[oops\n")
    result = run("serve", cwd=tmp_path)
    assert result.returncode != 0
    assert "VALID_API_KEYS" in result.stderr


# `ai-platform serve` stopping at startup: one line that names the variable, no traceback (issue 11).
SECRETS = 'SECRET_KEY=Zq3v9X1mK8pL2rT5wY7bN4cD6fG0hJ\nVALID_API_KEYS=["client-Hk29dLq8Zp3xWm"]\n'


def serve(
    cwd: Path, env: dict[str, str] | None = None, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `ai-platform serve`; one that starts instead of stopping fails the test (timeout)."""
    port = str(free_port())  # never 8000: other servers may run on this machine
    variables = {"PATH": "/usr/bin:/bin", "MODEL_ISOLATION": "thread", **(env or {})}
    command = [*(prefix or []), CLI, "serve", "--port", port]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=variables, timeout=60)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0 and output.count("\n") == 0 and "Traceback" not in output, output
    return output


def test_serve_logs_each_unused_model_map_entry_once_saying_why(tmp_path: Path) -> None:
    """Issue 13: a disabled plugin's entry was 'not an available operation', and every note was logged twice
    (once by the check that builds the app before serving, once by the worker)."""
    (tmp_path / ".env").write_text(SECRETS)
    port = free_port()
    variables = {
        "PATH": "/usr/bin:/bin",
        "MODEL_ISOLATION": "thread",
        "DISABLED_PLUGINS": "translate",
        "DEFAULT_MODEL": "absent",
        "OPERATION_MODEL_MAP": '{"summarize": "absent", "translate": "absent", "nosuch": "absent"}',
    }
    server = subprocess.Popen(
        [CLI, "serve", "--port", str(port)], cwd=tmp_path, env=variables, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while server.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        assert server.poll() is None, "the server did not start"
    finally:
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=60)
    console = [line for line in (stdout + stderr).splitlines() if "OPERATION_MODEL_MAP" in line]
    log = [
        line for line in (tmp_path / "logs" / "platform.log").read_text().splitlines() if "OPERATION_MODEL_MAP" in line
    ]
    for lines in (console, log):
        assert [line.split(" ", 2)[2] for line in lines] == [
            "WARNING ai_platform.plugins: OPERATION_MODEL_MAP names 'nosuch', which no loaded plugin provides;"
            " disabled plugins: translate",
            "INFO ai_platform.plugins: OPERATION_MODEL_MAP names 'translate', whose plugin is disabled"
            " (DISABLED_PLUGINS): not served",
        ], lines


def test_serve_refuses_the_placeholder_keys_of_env_example(tmp_path: Path) -> None:
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    line = one_line(serve(tmp_path))
    for name in ("SECRET_KEY", "VALID_API_KEYS", "ADMIN_API_KEYS"):
        assert f"{name}: " in line, line
    assert "change-me" not in line


@pytest.mark.parametrize("url", ["mysql://app:hunter2@db:3306/ai", "notaurl"])
def test_serve_with_an_invalid_database_url_says_so_in_one_line(tmp_path: Path, url: str) -> None:
    (tmp_path / ".env").write_text(SECRETS)
    line = one_line(serve(tmp_path, {"DATABASE_URL": url}))
    assert "DATABASE_URL: " in line and "hunter2" not in line


def test_serve_with_an_uncreatable_sqlite_folder_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(SECRETS)
    (tmp_path / "data").write_text("a file where the database's folder should be")
    line = one_line(serve(tmp_path, {"DATABASE_URL": "sqlite://data/usage.sqlite3"}))
    assert "DATABASE_URL: " in line and "data" in line, line
    line = one_line(serve(tmp_path, {"DATABASE_URL": "sqlite:///proc/ai-platform/usage.sqlite3"}))
    assert "DATABASE_URL: " in line and "/proc/ai-platform" in line, line


def test_serve_with_an_unreadable_sqlite_folder_says_so_in_one_line(tmp_path: Path) -> None:
    """The service user cannot enter the data folder. Root may enter any folder, so as root the server
    runs in a user namespace of its own, where root's privileges over these files are gone."""
    prefix = [require_program("unshare", "util-linux"), "--user"] if os.geteuid() == 0 else []
    if prefix and subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root where user namespaces are not allowed: no way to be refused a folder")
    (tmp_path / ".env").write_text(SECRETS)
    data = tmp_path / "data"
    data.mkdir(mode=0o000)
    try:
        line = one_line(serve(tmp_path, {"DATABASE_URL": "sqlite://data/usage.sqlite3"}, prefix=prefix))
    finally:
        data.chmod(0o700)
    assert "DATABASE_URL: " in line and "data" in line, line


@pytest.mark.parametrize("timeout", [None, "42"])
def test_serve_bounds_the_graceful_shutdown_by_the_request_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timeout: str | None
) -> None:
    """issue 11 #16: requests in flight finish on SIGTERM, but uvicorn waits no longer than one can run."""
    import uvicorn

    from ai_platform import cli

    calls: list[dict[str, Any]] = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "app_factory", lambda: None)
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    for name, value in (("SECRET_KEY", "Zq3v9X1mK8pL2rT5wY7bN4cD6fG0hJ"), ("VALID_API_KEYS", "client-Hk29dLq8Zp3xWm")):
        monkeypatch.setenv(name, value)
    if timeout is None:
        monkeypatch.delenv("REQUEST_TIMEOUT_SECONDS", raising=False)
    else:
        monkeypatch.setenv("REQUEST_TIMEOUT_SECONDS", timeout)
    cli.main(["serve"])
    expected = int(timeout or 300) + cli.GRACEFUL_SHUTDOWN_MARGIN_SECONDS
    assert calls[0]["timeout_graceful_shutdown"] == expected
