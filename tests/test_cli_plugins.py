"""`ai-platform plugins`: this environment's view without secrets, a server's view with --url, exit codes.

Also how every command ends on a closed pipe (`ai-platform plugins --json | head -1`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from ai_platform import hookimpl
from ai_platform.app import create_app
from ai_platform.plugins import ENTRY_POINT_GROUP, load_plugins
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from support import ADMIN_KEY, CLIENT_KEY, free_port
from test_disconnect import live_server

CLI = str(Path(sys.executable).parent / "ai-platform")
# No SECRET_KEY, no keys, no .env: what a plugin author's fresh folder has. DEFAULT_MODEL gives every
# installed operation (the example `sentiment` too) a model, so that no plugin has an error.
FRESH = {"PATH": "/usr/bin:/bin", "DEFAULT_MODEL": "demo"}
LOCAL_HEADING = f"Plugins as this environment ({sys.prefix}) loads them with the settings here;"


class FailingPlugin:
    """A plugin whose hook raises: it fails to register, and the server reports it."""

    @hookimpl
    def register_operations(self) -> list[Any]:
        raise ZeroDivisionError


def plugins(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "plugins", *args], cwd=cwd, env={**FRESH, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def table(stdout: str) -> dict[str, list[str]]:
    """The rows of the plugin table by name (the first line says whose view it is, the second is the header)."""
    return {line.split()[0]: line.split() for line in stdout.splitlines()[2:]}


def test_listing_needs_no_secrets_and_says_it_is_this_environments_view(tmp_path: Path) -> None:
    result = plugins(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "SECRET_KEY" not in result.stderr and "VALID_API_KEYS" not in result.stderr
    heading, header = result.stdout.splitlines()[:2]
    assert heading.startswith(LOCAL_HEADING) and "--url" in heading
    assert header.split() == ["NAME", "VERSION", "STATUS", "OPERATIONS", "HOOKS", "ERROR"]
    assert table(result.stdout)["summarize"][1:4] == ["0.1.0", "loaded", "summarize"]

    result = plugins("--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert (listing["view"], listing["environment"]) == ("local", sys.prefix)
    assert {p["name"]: p["status"] for p in listing["plugins"]}["translate"] == "loaded"


def test_listing_reads_the_plugin_settings_of_env_file_and_environment(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DISABLED_PLUGINS=translate\n")  # still no secrets
    result = plugins(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert table(result.stdout)["translate"][2] == "disabled"
    result = plugins("--json", cwd=tmp_path, env={"DISABLED_PLUGINS": "classify"})  # the environment wins
    assert {p["name"]: p["status"] for p in json.loads(result.stdout)["plugins"]}["classify"] == "disabled"
    result = plugins(cwd=tmp_path, env={"STRICT_PLUGINS": "maybe"})
    assert result.returncode != 0 and "STRICT_PLUGINS" in result.stderr and "Traceback" not in result.stderr


def broken_distribution(folder: Path) -> dict[str, str]:
    """An installed distribution whose plugin fails to import, found through PYTHONPATH."""
    dist = folder / "ai_platform_broken-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ai-platform-broken\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = ai_platform_broken\n")
    (folder / "ai_platform_broken.py").write_text("import no_such_dependency_xyz\n")
    return {"PYTHONPATH": str(folder)}


def test_a_failed_plugin_makes_the_listing_exit_1(tmp_path: Path) -> None:
    env = broken_distribution(tmp_path)
    result = plugins(cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert table(result.stdout)["broken"][2] == "failed"
    assert "No module named 'no_such_dependency_xyz'" in result.stdout
    assert table(result.stdout)["summarize"][2] == "loaded"  # the others are listed all the same
    result = plugins("--json", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert {p["name"]: p["status"] for p in json.loads(result.stdout)["plugins"]}["broken"] == "failed"
    # An operation without a model is not served either (/health: degraded).
    result = plugins(cwd=tmp_path, env={"DEFAULT_MODEL": ""})
    assert result.returncode != 0


@pytest.mark.anyio
async def test_url_shows_the_running_servers_view(env: dict[str, str], tmp_path: Path) -> None:
    """A plugin disabled only in the server's settings shows as disabled there and loaded here."""
    broken = ("broken", FailingPlugin())
    settings = Settings.from_mapping({**env, "DISABLED_PLUGINS": "translate"})
    loaded = load_plugins(enabled=["summarize", "translate", "classify", "broken"], disabled=["translate"])
    loaded_with_broken = load_plugins(
        enabled=["summarize", "translate", "classify", "broken"], disabled=["translate"], extra_plugins=[broken]
    )

    async def cli(*args: str, key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess[str]:
        variables = {**FRESH, **({"AI_PLATFORM_API_KEY": key} if key else {})}
        done = await anyio.run_process([CLI, "plugins", *args], cwd=tmp_path, env=variables, check=False)
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())

    async with live_server(create_app(settings, plugins=loaded, engine=FakeEngine())) as (server, _):
        url = f"http://127.0.0.1:{server.config.port}"
        result = await cli("--url", url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == f"Plugins of the server at {url} (its GET /plugins)"
        assert table(result.stdout)["translate"][2] == "disabled"
        result = await cli("--url", url + "/", "--json")
        assert result.returncode == 0, result.stderr
        listing = json.loads(result.stdout)
        assert (listing["view"], listing["url"]) == ("server", url + "/")
        assert {p["name"]: p["status"] for p in listing["plugins"]}["translate"] == "disabled"
        # The key: an admin one, from the environment or --api-key.
        result = await cli("--url", url, key=None)
        assert result.returncode != 0 and "AI_PLATFORM_API_KEY" in result.stderr
        result = await cli("--url", url, "--api-key", ADMIN_KEY, key=None)
        assert result.returncode == 0, result.stderr
        result = await cli("--url", url, key=CLIENT_KEY)
        assert result.returncode != 0 and "needs an admin key" in result.stderr
        assert "Traceback" not in result.stderr
    local = await cli()
    assert local.stdout.startswith(LOCAL_HEADING) and table(local.stdout)["translate"][2] == "loaded"

    settings = Settings.from_mapping({**env, "DISABLED_PLUGINS": "translate"})
    async with live_server(create_app(settings, plugins=loaded_with_broken, engine=FakeEngine())) as (server, _):
        result = await cli("--url", f"http://127.0.0.1:{server.config.port}")
        assert result.returncode == 1, result.stdout + result.stderr
        assert table(result.stdout)["broken"][2] == "failed"

    result = await cli("--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode != 0 and "cannot reach" in result.stderr and "Traceback" not in result.stderr
    result = await cli("--url", "file:///etc/passwd")
    assert result.returncode != 0 and "http://" in result.stderr


@pytest.mark.parametrize(
    "args",
    [["plugins", "--json"], ["plugins"], ["keys"], ["--help"], ["plugins", "--url", "http://127.0.0.1:1"]],
    ids=["plugins-json", "plugins", "keys", "help", "an-error"],
)
def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path, args: list[str]) -> None:
    """`ai-platform plugins --json | head -1`: the reader is gone. Here it is gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [CLI, *args], cwd=tmp_path, env={**FRESH, "AI_PLATFORM_API_KEY": "k"}, stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr
    if args[-1].startswith("http"):  # nothing printed to stdout: the error goes to stderr as usual
        assert result.returncode == 1 and "cannot reach" in result.stderr
    else:
        assert result.returncode == 141  # as a program killed by SIGPIPE


def test_head_reads_the_first_line(tmp_path: Path) -> None:
    """The pipeline of the issue, as a shell runs it."""
    result = subprocess.run(
        f"{CLI} plugins --json | head -1", shell=True, cwd=tmp_path, env=FRESH, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "{\n", "")
