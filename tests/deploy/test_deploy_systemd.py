"""deploy/systemd/ai-platform.service checked by systemd-analyze (verify, and the security score)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from deploy_harness import DEPLOY, UNIT, require

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

MAX_EXPOSURE = 2.0


def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    """verify needs ExecStart= to exist, so the unit is checked with /opt/ai_platform moved under tmp_path."""
    app = tmp_path / "opt" / "ai_platform"
    (app / "venv" / "bin").mkdir(parents=True)
    cli = app / "venv" / "bin" / "ai-platform"
    cli.write_text("#!/bin/sh\n")
    cli.chmod(0o755)
    unit = tmp_path / "ai-platform.service"
    unit.write_text(UNIT.read_text().replace("/opt/ai_platform", str(app)))
    result = subprocess.run([require("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True)
    # verify exits 0 on unknown keys and bad values too; they show up as messages.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_security_exposure_is_below_2_and_documented() -> None:
    result = subprocess.run(
        [require("systemd-analyze"), "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for ai-platform\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    assert score < MAX_EXPOSURE, result.stdout
    for place in (UNIT, DEPLOY / "README.md"):
        assert f"exposure {score}" in place.read_text(), f"{place} must record the current score {score}"


def test_unit_has_the_issues_hardening() -> None:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["User"] == ["aiplatform"] and settings["Group"] == ["aiplatform"]
    assert settings["ProtectSystem"] == ["strict"] and settings["PrivateTmp"] == ["yes"]
    assert settings["NoNewPrivileges"] == ["yes"] and settings["CapabilityBoundingSet"] == [""]
    assert settings["ReadWritePaths"] == ["/opt/ai_platform/data /opt/ai_platform/logs"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["WorkingDirectory"] == ["/opt/ai_platform"]  # where the app reads .env
    assert "ProcSubset" not in settings  # /health reads /proc/meminfo and /proc/stat
