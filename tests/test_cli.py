"""The `ai-platform` command's setup subcommands: init-env, keys, migrate."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

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
